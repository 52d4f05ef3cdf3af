/* The RFC 9329 receive side with a peer's bytes: Deframer.receive_data/next_event/pump
   (the Python engine's path) and lent_read (the inbound worker's path, reading a real
   socket), interleaved on one deframer at split points the input chooses, with EOF, any
   max_frame and either role. Checked: the buffer's bookkeeping after every step, the
   events' kinds and sizes, a protocol error that sticks, and every injected packet's
   headers and checksums. */
#include "fuzz_common.h"

typedef struct {
    Deframer *d;
    InjectBatch *batch;
    InboundWorker *worker; /* only its batch is used: lent_read's context */
    int sv[2];             /* sv[0]: the lent connection's socket, sv[1]: the peer */
    int lent_eof;
    PyObject *error;       /* the protocol error, once there is one */
    Py_ssize_t frames_in;
} State;

static void
check_buffer(State *s)
{
    Deframer *d = s->d;
    FUZZ_CHECK(d->pos <= d->len && d->len <= d->cap);
    FUZZ_CHECK((d->buf == NULL) == (d->cap == 0));
    FUZZ_CHECK(d->frames_in >= s->frames_in);
    s->frames_in = d->frames_in;
    if (s->error != NULL) {
        FUZZ_CHECK(d->error == s->error);
        FUZZ_CHECK(d->buf == NULL); /* a failed stream holds no receive memory */
    }
}

/* One event: 1 to go on, 0 when the stream waits for data or is over. */
static int
check_event(State *s, PyObject *ev)
{
    if (ev == fz_need || ev == fz_closed)
        return 0;
    if (ev == fz_keepalive || ev == fz_prefix)
        return 1;
    if (PyBytes_Check(ev)) { /* IKE, without its marker */
        FUZZ_CHECK(PyBytes_GET_SIZE(ev) >= 1 && PyBytes_GET_SIZE(ev) <= MAX_FRAME - 6);
        return 1;
    }
    if (PyByteArray_Check(ev)) { /* ESP from next_event() */
        FUZZ_CHECK(PyByteArray_GET_SIZE(ev) >= ESP_MIN_LEN);
        return 1;
    }
    if (PyUnicode_Check(ev)) /* an invalid frame: skipped, the stream goes on */
        return 1;
    FUZZ_CHECK(PyObject_TypeCheck(ev, (PyTypeObject *)PyExc_ValueError));
    if (s->error == NULL)
        s->error = Py_NewRef(ev);
    FUZZ_CHECK(ev == s->error); /* every event after a protocol error repeats it */
    return 0;
}

static void
feed(State *s, const uint8_t *p, size_t n)
{
    PyObject *b = FUZZ_PY(PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n));
    Py_DECREF(FUZZ_PY(fz_call1(s->d, "receive_data", b)));
    Py_DECREF(b);
}

static void
drain_next_event(State *s)
{
    for (int i = 0; i < 256; i++) {
        PyObject *ev = FUZZ_PY(fz_call(s->d, "next_event", NULL));
        int more = check_event(s, ev);
        Py_DECREF(ev);
        check_buffer(s);
        if (!more)
            return;
    }
}

/* The packets in the batch, each checked against the frame payloads they came from. */
static void
check_batch(State *s, const uint8_t *peer, const uint8_t *local, int v6, uint32_t sport,
            uint32_t dport)
{
    InjectBatch *b = s->batch;
    for (size_t i = 0; i < b->n; i++) {
        size_t hlen = v6 ? 48 : 28;
        const uint8_t *pkt = b->buf + b->pk[i].off;
        FUZZ_CHECK(b->pk[i].v6 == v6 && b->pk[i].len >= hlen + ESP_MIN_LEN);
        FUZZ_CHECK(b->pk[i].off + b->pk[i].len <= b->len && b->len <= b->cap);
        size_t plen = b->pk[i].len - hlen;
        FUZZ_CHECK(!(pkt[hlen] == 0 && pkt[hlen + 1] == 0 && pkt[hlen + 2] == 0 &&
                     pkt[hlen + 3] == 0)); /* never the non-ESP marker */
        check_injected(pkt, b->pk[i].len, v6, peer, local, sport, dport, pkt + hlen, plen);
    }
    PyObject *taken = FUZZ_PY(fz_call(b, "take", NULL));
    Py_DECREF(taken);
    FUZZ_CHECK(b->n == 0 && b->len == 0);
}

static void
drain_pump(State *s, Input *in)
{
    int v6 = in_u8(in) & 1;
    size_t alen = v6 ? 16 : 4, got;
    uint8_t peer[16] = {0}, local[16] = {0};
    memcpy(peer, in_bytes(in, alen, &got), got);
    memcpy(local, in_bytes(in, alen, &got), got);
    uint32_t sport = in_u16(in), dport = in_u16(in);
    PyObject *po = FUZZ_PY(PyBytes_FromStringAndSize((char *)peer, (Py_ssize_t)alen));
    PyObject *lo = FUZZ_PY(PyBytes_FromStringAndSize((char *)local, (Py_ssize_t)alen));
    PyObject *args = FUZZ_PY(Py_BuildValue("(OOOII)", s->batch, po, lo, sport, dport));
    for (int i = 0; i < 64; i++) {
        size_t before = s->batch->n;
        PyObject *res = FUZZ_PY(fz_call(s->d, "pump", args));
        PyObject *ev = PyTuple_GET_ITEM(res, 0);
        Py_ssize_t esp = PyLong_AsSsize_t(PyTuple_GET_ITEM(res, 1));
        FUZZ_CHECK(esp >= 0 && (size_t)esp == s->batch->n - before);
        int more = check_event(s, ev);
        Py_DECREF(res);
        check_buffer(s);
        if (!more)
            break;
    }
    check_batch(s, peer, local, v6, sport, dport);
    Py_DECREF(args);
    Py_DECREF(po);
    Py_DECREF(lo);
}

/* The inbound worker's read: the peer writes, lent_read reads the socket into the
   deframer and injects ESP, leaving the first other frame unread for Python. */
static void
lent_round(State *s, Input *in, const uint8_t *chunk, size_t n, int fin)
{
    Deframer *d = s->d;
    if (d->error != NULL || d->awaiting_prefix || d->eof || s->lent_eof)
        return; /* attach() refuses such a stream */
    if (n) {
        ssize_t w = send(s->sv[1], chunk, n, MSG_DONTWAIT);
        FUZZ_CHECK(w >= 0 || errno == EAGAIN);
    } else if (fin) {
        shutdown(s->sv[1], SHUT_WR); /* the peer's FIN */
        s->lent_eof = 1;
    } /* else a wake-up with nothing to read */
    uint8_t peer[16], local[16];
    int v6 = in_u8(in) & 1;
    memset(peer, 0xA5, sizeof peer);
    memset(local, 0x5A, sizeof local);
    Lent l = {.conn_id = 1, .fd = s->sv[0], .d = d, .v6 = v6, .sport = 4500, .dport = 4500,
              .max_rate = in_u8(in) % 4, .rate = {.start = mono_now()}};
    memcpy(l.peer, peer, 16);
    memcpy(l.local, local, 16);
    double now = l.rate.start + (in_u8(in) % 4) * 0.5; /* in the window, or past its end */
    int why = lent_read(s->worker, &l, now);
    FUZZ_CHECK(why >= 0 && why <= R_NOMEM && why != R_ERROR && why != R_NOMEM);
    FUZZ_CHECK((size_t)l.frames == s->batch->n);
    if (why == R_FRAME) /* the frame left for Python is a whole one, not ESP */
        FUZZ_CHECK(d->len - d->pos >= LENGTH_SIZE);
    check_buffer(s);
    check_batch(s, peer, local, v6, 4500, 4500);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_python_init();
    Input in = {data, size};
    uint8_t flags = in_u8(&in);
    uint32_t max_frame = in_u16(&in);
    if (max_frame < LENGTH_SIZE)
        max_frame = MAX_FRAME;
    PyObject *args = FUZZ_PY(Py_BuildValue("(O)", (flags & 1) ? Py_True : Py_False));
    PyObject *kw = FUZZ_PY(Py_BuildValue("{s:I}", "max_frame", max_frame));
    State s = {0};
    s.d = (Deframer *)FUZZ_PY(PyObject_Call((PyObject *)&DeframerType, args, kw));
    Py_DECREF(args);
    Py_DECREF(kw);
    s.batch = (InjectBatch *)FUZZ_PY(PyObject_CallNoArgs((PyObject *)&InjectBatchType));
    InboundWorker worker = {.batch = s.batch};
    s.worker = &worker;
    fuzz_socketpair(SOCK_STREAM, s.sv, 0);
    if (!(flags & 1) && (flags & 2)) /* an originator that sent its prefix */
        Py_DECREF(FUZZ_PY(fz_call(s.d, "send_prefix", NULL)));

    while (!in_empty(&in)) {
        uint8_t op = in_u8(&in);
        size_t want = (op & 0x80) ? in_u16(&in) : in_u8(&in), n;
        switch (op % 5) {
        case 0: { /* octets from the peer, at a split point of the input's choosing */
            const uint8_t *p = in_bytes(&in, want, &n);
            if (op & 0x40) /* or (part of) the stream prefix: no need to guess it */
                p = (const uint8_t *)PREFIX, n = want % (PREFIX_LEN + 1);
            if (n)
                feed(&s, p, n);
            break;
        }
        case 1:
            drain_next_event(&s);
            break;
        case 2:
            drain_pump(&s, &in);
            break;
        case 3: {
            const uint8_t *p = in_bytes(&in, want, &n);
            lent_round(&s, &in, p, n, op & 0x40);
            break;
        }
        case 4: /* EOF, then perhaps more data: a protocol error */
            feed(&s, (const uint8_t *)"", 0);
            break;
        }
        check_buffer(&s);
    }
    drain_next_event(&s);
    check_buffer(&s);
    close(s.sv[0]);
    close(s.sv[1]);
    Py_XDECREF(s.error);
    Py_DECREF(s.batch);
    Py_DECREF(s.d);
    return 0;
}
