/* The queue reader's nfnetlink parsing with hostile datagrams: nfq_packet on each
   datagram alone (its exact size on the heap, so a read past it is caught), then the whole
   read as QueueWorker and read_queue() do it (queue_round: recvmmsg from a datagram socket,
   parse, classify against installed flows, write hits, the batch verdict) and the tuple
   Python gets. Checked: a payload lies inside its datagram, the ids and counts Python gets
   are those of the parsed packets, the verdict names the highest id. */
#include "fuzz_common.h"

#define DGRAMS 16
#define DGRAM_MAX 1024

/* A datagram: mostly a well-formed NFQNL_MSG_PACKET whose lengths and types the input may
   bend, sometimes raw octets. -> its length. */
static size_t
datagram(Input *in, uint8_t *out)
{
    uint8_t form = in_u8(in);
    size_t n, got;
    if ((form & 7) == 7) {
        const uint8_t *p = in_bytes(in, in_u16(in) % DGRAM_MAX, &n);
        memcpy(out, p, n);
        return n;
    }
    memset(out, 0, DGRAM_MAX);
    size_t at = NLMSG_HDRLEN + 4; /* nlmsghdr, nfgenmsg */
    int nattrs = 1 + in_u8(in) % 5;
    for (int i = 0; i < nattrs && at + 8 <= DGRAM_MAX; i++) {
        uint8_t kind = in_u8(in);
        uint16_t type = kind % 3 == 0 ? NFQA_PACKET_HDR : kind % 3 == 1 ? NFQA_PAYLOAD : kind;
        if (kind & 0x40)
            type |= 0x8000; /* NLA_F_NESTED: masked off */
        size_t body;
        if (type == NFQA_PACKET_HDR) {
            body = 7; /* packet_id, hw_protocol, hook */
            uint32_t id = in_u8(in);
            out[at + 4] = (uint8_t)(id >> 24), out[at + 7] = (uint8_t)id;
        } else if ((type & NLA_TYPE_MASK_) == NFQA_PAYLOAD) {
            body = esp_packet(in, out + at + 4, DGRAM_MAX - at - 8);
        } else {
            body = in_u8(in) % 32;
            if (at + 4 + body > DGRAM_MAX)
                body = DGRAM_MAX - at - 4;
            memcpy(out + at + 4, in_bytes(in, body, &got), got);
        }
        uint16_t al = (uint16_t)(4 + body);
        if (kind & 0x80)
            al = (uint16_t)(al + (int8_t)in_u8(in)); /* a length that lies */
        memcpy(out + at, &al, 2);
        memcpy(out + at + 2, &type, 2);
        at += NLA_ALIGN(4 + body);
    }
    if (at > DGRAM_MAX)
        at = DGRAM_MAX;
    struct nlmsghdr nh = {.nlmsg_len = (uint32_t)at,
                          .nlmsg_type = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET};
    if (form & 8)
        nh.nlmsg_len += (int8_t)in_u8(in);
    if (form & 16)
        nh.nlmsg_type = (uint16_t)in_u16(in);
    memcpy(out, &nh, sizeof nh);
    if (form & 32) { /* a second message behind the first */
        size_t first = NLMSG_ALIGN(at);
        if (first + NLMSG_HDRLEN + 4 <= DGRAM_MAX) {
            memmove(out + first, out, DGRAM_MAX - first < at ? DGRAM_MAX - first : at);
            at = first + (DGRAM_MAX - first < at ? DGRAM_MAX - first : at);
        }
    }
    return at;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_python_init();
    Input in = {data, size};
    /* one cache for every input: its 4 MB of receive buffers are allocated once */
    static FlowCache *cache;
    if (cache == NULL)
        cache = (FlowCache *)FUZZ_PY(PyObject_CallNoArgs((PyObject *)&FlowCacheType));
    Py_DECREF(FUZZ_PY(fz_call(cache, "clear", NULL)));
    TcpWriter *w = (TcpWriter *)FUZZ_PY(
        PyObject_CallFunction((PyObject *)&TcpWriterType, "in", -1, (Py_ssize_t)1 << 20));
    PyObject *args = FUZZ_PY(Py_BuildValue("(IO)", 1u, w));
    Py_DECREF(FUZZ_PY(fz_call(cache, "set_writer", args)));
    Py_DECREF(args);
    int ninstall = in_u8(&in) % 4;
    for (int i = 0; i < ninstall; i++) { /* flows for conn 1 (a writer) and 2 (Python) */
        uint8_t pkt[256];
        size_t n = esp_packet(&in, pkt, sizeof pkt);
        args = FUZZ_PY(Py_BuildValue("(y#I)", pkt, (Py_ssize_t)n, 1u + (i & 1)));
        Py_DECREF(FUZZ_PY(fz_call(cache, "install", args)));
        Py_DECREF(args);
    }
    int sv[2];
    fuzz_socketpair(SOCK_DGRAM, sv, 0);
    size_t ndg = 1 + in_u8(&in) % DGRAMS, parsed = 0;
    long long last = -1;
    for (size_t i = 0; i < ndg; i++) {
        uint8_t *dg = malloc(DGRAM_MAX);
        FUZZ_CHECK(dg != NULL);
        size_t n = datagram(&in, dg);
        uint8_t *exact = malloc(n ? n : 1);
        FUZZ_CHECK(exact != NULL);
        memcpy(exact, dg, n);
        uint32_t id = 0;
        const uint8_t *payload = NULL;
        size_t plen = 0;
        if (nfq_packet(exact, n, &id, &payload, &plen)) {
            parsed++;
            last = (long long)id > last ? (long long)id : last;
            FUZZ_CHECK(payload == NULL ||
                       (payload >= exact && plen <= n && payload <= exact + n - plen));
            FlowKey k;
            size_t esp_at, total;
            if (payload != NULL && flow_key(payload, plen, &k, &esp_at, &total))
                FUZZ_CHECK(esp_at < total && total <= plen);
        }
        FUZZ_CHECK(send(sv[1], dg, n, 0) == (ssize_t)n);
        free(exact);
        free(dg);
    }
    int queue_num = in_u8(&in) & 1 ? 7 : -1;
    args = FUZZ_PY(Py_BuildValue("(ii)", sv[0], queue_num));
    PyObject *res = FUZZ_PY(fz_call(cache, "read_queue", args));
    Py_DECREF(args);
    FUZZ_CHECK(PyLong_AsLongLong(PyTuple_GET_ITEM(res, 0)) == last);
    FUZZ_CHECK((size_t)PyLong_AsSsize_t(PyTuple_GET_ITEM(res, 1)) == parsed);
    PyObject *misses = PyTuple_GET_ITEM(res, 2), *hits = PyTuple_GET_ITEM(res, 3);
    Py_ssize_t frames = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(hits); i++) {
        PyObject *t = PyList_GET_ITEM(hits, i);
        PyObject *b = PyTuple_GET_ITEM(t, 1);
        FUZZ_CHECK(PyLong_AsLong(PyTuple_GET_ITEM(t, 0)) == 2); /* conn 1 writes in C */
        Py_ssize_t nf = check_frames((uint8_t *)PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
        FUZZ_CHECK(nf == PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 2)));
        frames += nf;
    }
    frames += w->direct_frames;
    FUZZ_CHECK((size_t)(PyList_GET_SIZE(misses) + frames) == parsed);
    FUZZ_CHECK((w->buf ? check_frames(w->buf + w->pos, w->len - w->pos) : 0) == w->direct_frames);
    /* the verdict: NF_DROP up to the highest id, sent back on the queue's socket */
    uint8_t v[256];
    ssize_t vn = recv(sv[1], v, sizeof v, MSG_DONTWAIT);
    if (queue_num >= 0 && last >= 0) {
        FUZZ_CHECK(vn == NLMSG_HDRLEN + 16);
        uint32_t got = ((uint32_t)v[NLMSG_HDRLEN + 12] << 24) |
                       ((uint32_t)v[NLMSG_HDRLEN + 13] << 16) |
                       ((uint32_t)v[NLMSG_HDRLEN + 14] << 8) | v[NLMSG_HDRLEN + 15];
        FUZZ_CHECK(got == (uint32_t)last);
        FUZZ_CHECK(PyLong_AsLong(PyTuple_GET_ITEM(res, 6)) == 0);
    } else {
        FUZZ_CHECK(vn < 0);
    }
    Py_DECREF(res);
    close(sv[0]);
    close(sv[1]);
    PyObject *one = FUZZ_PY(PyLong_FromLong(1));
    Py_DECREF(FUZZ_PY(fz_call1(cache, "drop_writer", one)));
    Py_DECREF(one);
    FUZZ_CHECK(cache->wcount == 0);
    Py_DECREF(w);
    return 0;
}
