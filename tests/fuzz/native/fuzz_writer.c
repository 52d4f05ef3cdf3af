/* One connection's send buffer (TcpWriter) on a real socket with a small send buffer, so
   sends are partial: Python's writes (IKE and ESP, any bound), flushes, the flow cache's
   hits written in C into the same buffer, a peer that reads slowly, hangs up, or a writer
   closed under load; or a collecting writer (fd -1) and take(). Checked: what the peer
   reads is exactly the admitted octets, in the order they were admitted; the bound's
   decisions; the buffer's bookkeeping; a broken writer holds no memory. */
#include "fuzz_common.h"

#define PKTS 8

typedef struct {
    TcpWriter *w;
    FlowCache *cache;
    int sv[2];
    int collect;
    size_t ike_factor; /* IKE is admitted up to limit * ike_factor queued octets */
    int peer_closed;
    uint8_t *expect; /* every admitted octet, in order */
    size_t nexpect, nread;
    uint8_t flow[256]; /* the packet the cache has a flow for (conn 1, this writer) */
    size_t nflow;
} State;

static void
expect_add(State *s, const uint8_t *p, size_t n)
{
    s->expect = realloc(s->expect, s->nexpect + n + 1);
    FUZZ_CHECK(s->expect != NULL);
    memcpy(s->expect + s->nexpect, p, n);
    s->nexpect += n;
}

static void
check_writer(State *s)
{
    TcpWriter *w = s->w;
    FUZZ_CHECK(w->pos <= w->len && w->len <= w->cap);
    FUZZ_CHECK((w->buf == NULL) == (w->cap == 0));
    if (w->error)
        FUZZ_CHECK(w->buf == NULL && w->len == 0);
    /* the unsent octets are the tail of what was admitted */
    size_t pending = w->len - w->pos;
    FUZZ_CHECK(pending <= s->nexpect);
    if (pending)
        FUZZ_CHECK(memcmp(w->buf + w->pos, s->expect + s->nexpect - pending, pending) == 0);
}

/* The peer reads up to n octets: they must be the next admitted ones. */
static void
peer_read(State *s, size_t n)
{
    uint8_t buf[4096];
    while (n && !s->peer_closed && !s->collect) {
        ssize_t r = recv(s->sv[1], buf, n < sizeof buf ? n : sizeof buf, MSG_DONTWAIT);
        if (r <= 0)
            break;
        FUZZ_CHECK(s->nread + (size_t)r <= s->nexpect);
        FUZZ_CHECK(memcmp(buf, s->expect + s->nread, (size_t)r) == 0);
        s->nread += (size_t)r;
        n -= (size_t)r;
    }
}

static void
py_write(State *s, Input *in)
{
    uint8_t flags = in_u8(in);
    int is_ike = flags & 1;
    Py_ssize_t frames = 1 + (flags >> 5);
    size_t want = (flags & 2) ? in_u16(in) : in_u8(in), n;
    const uint8_t *p = in_bytes(in, want, &n);
    TcpWriter *w = s->w;
    size_t queued = w->len - w->pos;
    int admit = !w->error && (queued <= w->limit ||
                              (is_ike && queued <= w->limit * s->ike_factor));
    Py_ssize_t esp0 = w->esp_dropped, ike0 = w->ike_dropped;
    PyObject *args = FUZZ_PY(Py_BuildValue("(y#in)", p, (Py_ssize_t)n, is_ike, frames));
    PyObject *r = FUZZ_PY(fz_call(w, "write", args));
    Py_DECREF(args);
    FUZZ_CHECK((r == Py_True) == admit);
    Py_DECREF(r);
    if (admit) {
        if (!w->error) /* octets written after the send that broke it are gone */
            expect_add(s, p, n);
    } else {
        FUZZ_CHECK(is_ike ? w->ike_dropped == ike0 + 1 : w->esp_dropped == esp0 + frames);
    }
}

/* The flow cache's hits for this writer's connection, written in C. */
static void
direct(State *s, Input *in)
{
    size_t n = 1 + in_u8(in) % PKTS;
    PyObject *list = FUZZ_PY(PyList_New((Py_ssize_t)n));
    uint8_t hit[PKTS];
    for (size_t i = 0; i < n; i++) {
        uint8_t pkt[256];
        size_t len = s->nflow;
        hit[i] = in_u8(in) & 1;
        if (hit[i])
            memcpy(pkt, s->flow, len);
        else
            len = esp_packet(in, pkt, sizeof pkt);
        PyList_SET_ITEM(list, (Py_ssize_t)i,
                        FUZZ_PY(PyBytes_FromStringAndSize((char *)pkt, (Py_ssize_t)len)));
    }
    Py_ssize_t before = s->w->direct_frames;
    int broken = s->w->error != 0;
    PyObject *res = FUZZ_PY(fz_call1(s->cache, "classify", list));
    Py_ssize_t written = s->w->direct_frames - before;
    /* admission stops at the bound, and the bound stays passed until the next flush */
    FlowKey k;
    size_t esp_at = 0, total = 0;
    FUZZ_CHECK(flow_key(s->flow, s->nflow, &k, &esp_at, &total));
    for (size_t i = 0, done = 0; i < n && done < (size_t)written; i++) {
        PyObject *b = PyList_GET_ITEM(list, (Py_ssize_t)i);
        FlowKey ki;
        size_t ea, t;
        if (!flow_key((uint8_t *)PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b), &ki, &ea,
                      &t) ||
            memcmp(&ki, &k, sizeof k) != 0)
            continue;
        uint8_t len[2];
        put16(len, (uint32_t)(LENGTH_SIZE + t - ea));
        if (!broken) {
            expect_add(s, len, 2);
            expect_add(s, (uint8_t *)PyBytes_AS_STRING(b) + ea, t - ea);
        }
        done++;
    }
    FUZZ_CHECK(!broken || written == 0);
    FUZZ_CHECK(PyList_GET_SIZE(PyTuple_GET_ITEM(res, 1)) == 0); /* a writer takes them all */
    Py_DECREF(res);
    Py_DECREF(list);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_python_init();
    Input in = {data, size};
    State s = {0};
    uint8_t flags = in_u8(&in);
    s.collect = flags & 1;
    fuzz_socketpair(SOCK_STREAM, s.sv, 1024 + 256 * (flags >> 1));
    Py_ssize_t limit = (Py_ssize_t)in_u16(&in);
    s.ike_factor = 1 + in_u8(&in) % 8;
    s.w = (TcpWriter *)FUZZ_PY(PyObject_CallFunction((PyObject *)&TcpWriterType, "inn",
                                                     s.collect ? -1 : s.sv[0], limit,
                                                     (Py_ssize_t)s.ike_factor));
    s.cache = (FlowCache *)FUZZ_PY(PyObject_CallNoArgs((PyObject *)&FlowCacheType));
    Input tmpl = {(const uint8_t *)"\x00\x20\x01\x01\x02", 5}; /* a well-formed flow */
    s.nflow = esp_packet(&tmpl, s.flow, sizeof s.flow);
    PyObject *args = FUZZ_PY(Py_BuildValue("(y#I)", s.flow, (Py_ssize_t)s.nflow, 1u));
    FUZZ_CHECK(FUZZ_PY(fz_call(s.cache, "install", args)) == Py_True);
    Py_DECREF(Py_True);
    Py_DECREF(args);
    args = FUZZ_PY(Py_BuildValue("(IO)", 1u, s.w));
    Py_DECREF(FUZZ_PY(fz_call(s.cache, "set_writer", args)));
    Py_DECREF(args);

    while (!in_empty(&in)) {
        uint8_t op = in_u8(&in);
        switch (op % 7) {
        case 0:
        case 1:
            py_write(&s, &in);
            break;
        case 2:
            direct(&s, &in);
            break;
        case 3: {
            PyObject *r = FUZZ_PY(fz_call(s.w, "flush", NULL));
            FUZZ_CHECK(PyLong_AsSize_t(r) == s.w->len - s.w->pos);
            Py_DECREF(r);
            break;
        }
        case 4:
            peer_read(&s, (size_t)in_u16(&in));
            break;
        case 5:
            if (s.collect) { /* take(): the queue, which the model must equal */
                PyObject *b = FUZZ_PY(fz_call(s.w, "take", NULL));
                size_t n = (size_t)PyBytes_GET_SIZE(b);
                FUZZ_CHECK(n == s.nexpect - s.nread);
                FUZZ_CHECK(n == 0 || memcmp(PyBytes_AS_STRING(b), s.expect + s.nread, n) == 0);
                s.nread += n;
                Py_DECREF(b);
            } else if (!s.peer_closed && (op & 0x80)) { /* the peer hangs up */
                peer_read(&s, SIZE_MAX);
                close(s.sv[1]);
                s.peer_closed = 1;
            }
            break;
        case 6:
            if (op & 0x80) { /* the connection closes under load: later writes dropped */
                Py_DECREF(FUZZ_PY(fz_call(s.w, "close", NULL)));
                FUZZ_CHECK(s.w->error != 0 && s.w->buf == NULL); /* its queue is gone */
                if (s.collect)
                    s.nread = s.nexpect; /* (a socket keeps what it was given) */
            }
            break;
        }
        check_writer(&s);
    }
    /* the peer reads the rest: with a healthy writer, everything admitted arrives */
    if (!s.collect && !s.peer_closed && !s.w->error) {
        for (int i = 0; i < 10000 && s.nread < s.nexpect; i++) {
            Py_DECREF(FUZZ_PY(fz_call(s.w, "flush", NULL)));
            peer_read(&s, SIZE_MAX);
        }
        FUZZ_CHECK(s.nread == s.nexpect);
    }
    if (!s.peer_closed)
        close(s.sv[1]);
    close(s.sv[0]);
    free(s.expect);
    Py_DECREF(s.cache);
    Py_DECREF(s.w);
    return 0;
}
