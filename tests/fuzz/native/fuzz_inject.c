/* The packets charon is handed (InjectBatch): IPv4 and IPv6 headers built for any
   addresses, ports and payload, up to the largest frame a peer can send, in batches that
   grow past the point where their memory is given back; take() and a send that fails for
   every packet (no socket: nothing leaves the machine). Checked: every header field, and
   both checksums against a plain one's complement sum. */
#include "fuzz_common.h"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_python_init();
    Input in = {data, size};
    InjectBatch *b = (InjectBatch *)FUZZ_PY(PyObject_CallNoArgs((PyObject *)&InjectBatchType));
    static uint8_t payload[MAX_FRAME];
    while (!in_empty(&in)) {
        uint8_t op = in_u8(&in);
        if (op % 8 == 7) { /* send with no socket: each packet fails once, the batch empties */
            size_t n = b->n;
            Py_ssize_t sent = -1, failed = -1;
            batch_send(b, -1, -1, &sent, &failed);
            FUZZ_CHECK(sent == 0 && (size_t)failed == n && b->n == 0 && b->len == 0);
            FUZZ_CHECK(n == 0 || b->last_errno == EBADF);
            continue;
        }
        if (op % 8 == 6) {
            size_t n = b->n;
            PyObject *list = FUZZ_PY(fz_call(b, "take", NULL));
            FUZZ_CHECK((size_t)PyList_GET_SIZE(list) == n && b->n == 0);
            Py_DECREF(list);
            continue;
        }
        int v6 = op & 1;
        size_t alen = v6 ? 16 : 4, got;
        uint8_t peer[16] = {0}, local[16] = {0};
        memcpy(peer, in_bytes(&in, alen, &got), got);
        memcpy(local, in_bytes(&in, alen, &got), got);
        uint32_t sport = in_u16(&in), dport = in_u16(&in);
        /* a payload of the input's octets, repeated to any length a frame can carry */
        size_t plen = (op & 2) ? in_u16(&in) % (MAX_FRAME - LENGTH_SIZE + 1) : in_u8(&in);
        const uint8_t *src = in_bytes(&in, plen, &got);
        for (size_t i = 0; i < plen; i++)
            payload[i] = got ? src[i % got] : (uint8_t)(i * 7);
        size_t n0 = b->n, len0 = b->len;
        FUZZ_CHECK(batch_add(b, peer, local, v6, sport, dport, payload, plen) == 0);
        FUZZ_CHECK(b->n == n0 + 1 && b->n <= b->pcap && b->len <= b->cap);
        Pending *p = &b->pk[n0];
        FUZZ_CHECK(p->off == len0 && p->v6 == v6);
        check_injected(b->buf + p->off, p->len, v6, peer, local, sport, dport, payload, plen);
    }
    for (size_t i = 0; i < b->n; i++) /* every packet inside the batch's buffer */
        FUZZ_CHECK(b->pk[i].off + b->pk[i].len <= b->len);
    Py_DECREF(b);
    return 0;
}
