/* The flow cache: installs, lookups (classify) with packets built from the input and raw
   octets, clears (also after a burst that grew the table past its shrink point), and the
   writers that take a connection's hits in C. A model (a plain list of the installed keys
   and the writers set) says what every classify must give: which packets miss, which
   connection each hit goes to, and the exact octets each writer holds. */
#include "fuzz_common.h"

#define CONNS 4 /* connection ids 1..CONNS */
#define MODEL_MAX 1024
#define ROUND_MAX 32
#define PKT_MAX 256

typedef struct {
    FlowKey key;
    uint32_t conn_id;
} ModelFlow;

#define BURST_MAX 1024

typedef struct {
    FlowCache *cache;
    ModelFlow flows[MODEL_MAX];
    size_t nflows;
    uint32_t burst[BURST_MAX]; /* the conn_id of burst flow i (0: none): found in O(1) */
    size_t nburst;
    TcpWriter *writers[CONNS + 1];
    int has_writer[CONNS + 1];
    uint8_t *expect[CONNS + 1]; /* what each writer must hold */
    size_t nexpect[CONNS + 1];
} State;

/* The flows of burst(): 198.18.0.7 -> 198.19.0.9, port 4500, SPI 0x4000xxxx. */
static uint32_t *
burst_slot(State *s, const FlowKey *k)
{
    static const uint8_t src[4] = {198, 18, 0, 7}, dst[4] = {198, 19, 0, 9};
    if (k->v6 || k->dport != NATT_PORT || (k->spi >> 16) != 0x4000 ||
        (k->spi & 0xFFFF) >= BURST_MAX || memcmp(k->src, src, 4) || memcmp(k->dst, dst, 4))
        return NULL;
    return &s->burst[k->spi & 0xFFFF];
}

static uint32_t
model_lookup(State *s, const uint8_t *p, size_t n, size_t *esp_at, size_t *total)
{
    FlowKey k;
    if (!flow_key(p, n, &k, esp_at, total))
        return 0;
    uint32_t *b = burst_slot(s, &k);
    if (b != NULL)
        return *b;
    for (size_t i = 0; i < s->nflows; i++)
        if (memcmp(&s->flows[i].key, &k, sizeof k) == 0)
            return s->flows[i].conn_id;
    return 0;
}

static void
install(State *s, const uint8_t *p, size_t n, uint32_t conn_id)
{
    PyObject *args = FUZZ_PY(Py_BuildValue("(y#I)", p, (Py_ssize_t)n, conn_id));
    PyObject *r = FUZZ_PY(fz_call(s->cache, "install", args));
    Py_DECREF(args);
    FlowKey k;
    size_t esp_at, total;
    int ok = flow_key(p, n, &k, &esp_at, &total);
    FUZZ_CHECK((r == Py_True) == ok);
    Py_DECREF(r);
    if (!ok)
        return;
    uint32_t *b = burst_slot(s, &k);
    if (b != NULL) {
        s->nburst += *b == 0;
        *b = conn_id;
        return;
    }
    for (size_t i = 0; i < s->nflows; i++) {
        if (memcmp(&s->flows[i].key, &k, sizeof k) == 0) {
            s->flows[i].conn_id = conn_id;
            return;
        }
    }
    FUZZ_CHECK(s->nflows < MODEL_MAX); /* at most one per op: the input is not that long */
    s->flows[s->nflows].key = k;
    s->flows[s->nflows++].conn_id = conn_id;
}

static void
check_table(State *s)
{
    FlowCache *c = s->cache;
    FUZZ_CHECK(c->count * 2 <= c->cap || (c->cap == 0 && c->count == 0));
    FUZZ_CHECK(c->cap == 0 || (c->cap & (c->cap - 1)) == 0);
    FUZZ_CHECK(c->count == s->nflows + s->nburst);
    size_t used = 0;
    for (size_t i = 0; i < c->cap; i++)
        used += c->flows[i].key.used;
    FUZZ_CHECK(used == c->count);
    FUZZ_CHECK(c->wcount * 2 <= c->wcap || c->wcap == 0);
}

/* A burst of flows (each its own SPI): the table grows, and a clear after it shrinks. */
static void
burst(State *s, Input *in)
{
    size_t k = 64 + (size_t)(in_u8(in) % 8) * 64; /* 576 flows: a table of 2048 */
    FUZZ_CHECK(k <= BURST_MAX);
    uint8_t pkt[36] = {0x45, 0, 0, 36, 0, 0, 0, 0, 64, PROTO_UDP};
    pkt[12] = 198, pkt[13] = 18, pkt[15] = 7, pkt[16] = 198, pkt[17] = 19, pkt[19] = 9;
    put16(pkt + 20, NATT_PORT);
    put16(pkt + 22, NATT_PORT);
    put16(pkt + 24, 16);
    pkt[28] = 0x40;
    for (size_t i = 0; i < k; i++) {
        put16(pkt + 30, (uint32_t)i);
        install(s, pkt, sizeof pkt, 1 + (uint32_t)(i % CONNS));
    }
}

static void
classify(State *s, Input *in)
{
    size_t n = 1 + in_u8(in) % ROUND_MAX;
    uint8_t bufs[ROUND_MAX][PKT_MAX];
    size_t lens[ROUND_MAX];
    PyObject *list = FUZZ_PY(PyList_New((Py_ssize_t)n));
    for (size_t i = 0; i < n; i++) {
        lens[i] = esp_packet(in, bufs[i], PKT_MAX);
        PyList_SET_ITEM(list, (Py_ssize_t)i,
                        FUZZ_PY(PyBytes_FromStringAndSize((char *)bufs[i], (Py_ssize_t)lens[i])));
    }
    Py_ssize_t direct0[CONNS + 1];
    for (int c = 1; c <= CONNS; c++)
        direct0[c] = s->writers[c]->direct_frames;
    PyObject *res = FUZZ_PY(fz_call1(s->cache, "classify", list));
    PyObject *misses = PyTuple_GET_ITEM(res, 0), *hits = PyTuple_GET_ITEM(res, 1);
    /* what the model says, packet by packet */
    uint32_t want[ROUND_MAX];
    Py_ssize_t frames[CONNS + 1] = {0}, written[CONNS + 1] = {0};
    size_t bytes[CONNS + 1] = {0};
    Py_ssize_t nmiss = 0;
    for (size_t i = 0; i < n; i++) {
        size_t esp_at = 0, total = 0;
        want[i] = model_lookup(s, bufs[i], lens[i], &esp_at, &total);
        if (want[i] == 0) {
            nmiss++;
            continue;
        }
        uint32_t c = want[i];
        size_t m = total - esp_at;
        if (!s->has_writer[c]) {
            frames[c]++;
            bytes[c] += LENGTH_SIZE + m;
            continue;
        }
        TcpWriter *w = s->writers[c];
        if (s->nexpect[c] > w->limit)
            continue; /* over the bound: the frame is dropped and counted */
        s->expect[c] = realloc(s->expect[c], s->nexpect[c] + LENGTH_SIZE + m);
        FUZZ_CHECK(s->expect[c] != NULL);
        put16(s->expect[c] + s->nexpect[c], (uint32_t)(LENGTH_SIZE + m));
        memcpy(s->expect[c] + s->nexpect[c] + LENGTH_SIZE, bufs[i] + esp_at, m);
        s->nexpect[c] += LENGTH_SIZE + m;
        written[c]++;
    }
    FUZZ_CHECK(PyList_GET_SIZE(misses) == nmiss);
    for (Py_ssize_t j = 0; j < nmiss; j++) { /* ascending, each one a miss */
        size_t idx = PyLong_AsSize_t(PyList_GET_ITEM(misses, j));
        FUZZ_CHECK(idx < n && want[idx] == 0);
        FUZZ_CHECK(j == 0 || idx > PyLong_AsSize_t(PyList_GET_ITEM(misses, j - 1)));
    }
    Py_ssize_t nconns = 0;
    for (int c = 1; c <= CONNS; c++)
        nconns += frames[c] > 0;
    FUZZ_CHECK(PyList_GET_SIZE(hits) == nconns);
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(hits); j++) {
        PyObject *t = PyList_GET_ITEM(hits, j);
        uint32_t c = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(t, 0));
        PyObject *data = PyTuple_GET_ITEM(t, 1);
        Py_ssize_t nf = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 2));
        FUZZ_CHECK(c >= 1 && c <= CONNS && !s->has_writer[c]);
        FUZZ_CHECK(check_frames((uint8_t *)PyBytes_AS_STRING(data),
                                (size_t)PyBytes_GET_SIZE(data)) == nf);
        FUZZ_CHECK(nf == frames[c] && (size_t)PyBytes_GET_SIZE(data) == bytes[c]);
    }
    for (int c = 1; c <= CONNS; c++) {
        TcpWriter *w = s->writers[c];
        FUZZ_CHECK(w->direct_frames - direct0[c] == written[c]);
        FUZZ_CHECK(w->len - w->pos == s->nexpect[c]);
    }
    Py_DECREF(res);
    Py_DECREF(list);
}

static void
take(State *s, uint32_t c)
{
    PyObject *b = FUZZ_PY(fz_call(s->writers[c], "take", NULL));
    size_t n = (size_t)PyBytes_GET_SIZE(b);
    check_frames((uint8_t *)PyBytes_AS_STRING(b), n);
    FUZZ_CHECK(n == s->nexpect[c] &&
                   (n == 0 || memcmp(PyBytes_AS_STRING(b), s->expect[c], n) == 0));
    s->nexpect[c] = 0;
    Py_DECREF(b);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_python_init();
    Input in = {data, size};
    State *s = calloc(1, sizeof *s);
    FUZZ_CHECK(s != NULL);
    s->cache = (FlowCache *)FUZZ_PY(PyObject_CallNoArgs((PyObject *)&FlowCacheType));
    for (int c = 1; c <= CONNS; c++) /* fd -1: collecting, for take() */
        s->writers[c] = (TcpWriter *)FUZZ_PY(PyObject_CallFunction(
            (PyObject *)&TcpWriterType, "in", -1, (Py_ssize_t)in_u8(&in) * 16));
    while (!in_empty(&in)) {
        uint8_t op = in_u8(&in);
        uint32_t c = 1 + (op >> 4) % CONNS;
        switch (op % 8) {
        case 0:
        case 1: {
            uint8_t pkt[PKT_MAX];
            size_t n = esp_packet(&in, pkt, sizeof pkt);
            install(s, pkt, n, c);
            break;
        }
        case 2:
            burst(s, &in);
            break;
        case 3:
        case 4:
            classify(s, &in);
            break;
        case 5:
            Py_DECREF(FUZZ_PY(fz_call(s->cache, "clear", NULL)));
            s->nflows = s->nburst = 0;
            memset(s->burst, 0, sizeof s->burst);
            break;
        case 6: {
            PyObject *args = FUZZ_PY(Py_BuildValue("(IO)", c, s->writers[c]));
            Py_DECREF(FUZZ_PY(fz_call(s->cache, "set_writer", args)));
            Py_DECREF(args);
            s->has_writer[c] = 1;
            FUZZ_CHECK(writer_find(s->cache, c) == s->writers[c]);
            break;
        }
        case 7: {
            PyObject *id = FUZZ_PY(PyLong_FromUnsignedLong(c));
            if (op & 0x40) {
                Py_DECREF(FUZZ_PY(fz_call1(s->cache, "drop_writer", id)));
                s->has_writer[c] = 0;
                FUZZ_CHECK(writer_find(s->cache, c) == NULL);
            } else {
                take(s, c);
            }
            Py_DECREF(id);
            break;
        }
        }
        check_table(s);
    }
    for (int c = 1; c <= CONNS; c++) {
        take(s, c);
        free(s->expect[c]);
    }
    Py_DECREF(s->cache); /* releases the writers it holds */
    for (int c = 1; c <= CONNS; c++)
        Py_DECREF(s->writers[c]);
    free(s);
    return 0;
}
