/* InjectBatch (inject.h): the packets charon gets, built and sent in batches. */
#include "inject.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>

/* ------------------------------------------------------------------------------------ */
/* Checksums: sums congruent modulo 0xFFFF to the one's complement sum of 16-bit words,   */
/* as tcpencap.wire.packet.word_sum/fold compute them.                                    */

static uint64_t
word_sum(const uint8_t *p, size_t n)
{
    uint64_t s = 0;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w = __builtin_bswap64(w);
        s += w;
        if (s < w)
            s++; /* 2**64 == 1 (mod 0xFFFF): the end-around carry keeps the congruence */
        p += 8;
        n -= 8;
    }
    uint64_t t = 0;
    while (n >= 2) {
        t += ((uint32_t)p[0] << 8) | p[1];
        p += 2;
        n -= 2;
    }
    if (n)
        t += (uint32_t)p[0] << 8;
    return (s % 0xFFFF) + t;
}

static uint16_t
fold(uint64_t total)
{
    uint64_t t = total % 0xFFFF;
    if (t == 0)
        t = 0xFFFF;
    return (uint16_t)(~t & 0xFFFF);
}

/* ------------------------------------------------------------------------------------ */
/* InjectBatch                                                                            */

static int
batch_reserve(InjectBatch *b, size_t bytes)
{
    if (b->n == b->pcap) {
        size_t ncap = b->pcap ? b->pcap * 2 : 64;
        Pending *np = PyMem_RawRealloc(b->pk, ncap * sizeof(Pending));
        if (np == NULL)
            return -1;
        b->pk = np;
        b->pcap = ncap;
    }
    if (b->len + bytes > b->cap) {
        size_t ncap = b->cap ? b->cap : 65536;
        while (ncap < b->len + bytes)
            ncap *= 2;
        uint8_t *nb = PyMem_RawRealloc(b->buf, ncap);
        if (nb == NULL)
            return -1;
        b->buf = nb;
        b->cap = ncap;
    }
    return 0;
}

static void
batch_reset(InjectBatch *b)
{
    b->n = 0;
    b->len = 0;
    if (b->cap > (1u << 20)) { /* a burst is over: give the memory back */
        PyMem_RawFree(b->buf);
        b->buf = NULL;
        b->cap = 0;
    }
}

/* The packet Router._inject builds: source = the peer, destination = our address. */
int
batch_add(InjectBatch *b, const uint8_t *peer, const uint8_t *local, int v6, uint32_t sport,
          uint32_t dport, const uint8_t *payload, size_t plen)
{
    size_t hlen = v6 ? 48 : 28;
    if (batch_reserve(b, hlen + plen) < 0)
        return -1;
    uint8_t *h = b->buf + b->len;
    uint64_t addr_sum = word_sum(peer, v6 ? 16 : 4) + word_sum(local, v6 ? 16 : 4);
    if (!v6) {
        uint32_t n = (uint32_t)(28 + plen);
        uint16_t csum = fold(0x4500 + ((64 << 8) | PROTO_UDP) + n + addr_sum);
        h[0] = 0x45;
        h[1] = 0;
        put16(h + 2, n);
        memset(h + 4, 0, 4);
        h[8] = 64;
        h[9] = PROTO_UDP;
        put16(h + 10, csum);
        memcpy(h + 12, peer, 4);
        memcpy(h + 16, local, 4);
        put16(h + 20, sport);
        put16(h + 22, dport);
        put16(h + 24, n - 20);
        put16(h + 26, 0); /* IPv4 allows UDP checksum 0 */
    } else {
        uint32_t n = (uint32_t)(8 + plen);
        uint64_t total = addr_sum + PROTO_UDP + n + sport + dport + n + word_sum(payload, plen);
        uint16_t csum = fold(total);
        if (csum == 0)
            csum = 0xFFFF;
        h[0] = 0x60;
        memset(h + 1, 0, 3);
        put16(h + 4, n);
        h[6] = PROTO_UDP;
        h[7] = 64;
        memcpy(h + 8, peer, 16);
        memcpy(h + 24, local, 16);
        put16(h + 40, sport);
        put16(h + 42, dport);
        put16(h + 44, n);
        put16(h + 46, csum);
    }
    memcpy(h + hlen, payload, plen);
    Pending *p = &b->pk[b->n++];
    p->off = b->len;
    p->len = hlen + plen;
    p->v6 = (uint8_t)v6;
    b->len += hlen + plen;
    return 0;
}

int
addr_pair(PyObject *peer_o, PyObject *local_o, const uint8_t **peer, const uint8_t **local,
          int *v6)
{
    if (!PyBytes_Check(peer_o) || !PyBytes_Check(local_o)) {
        PyErr_SetString(PyExc_TypeError, "addresses must be bytes");
        return -1;
    }
    Py_ssize_t plen = PyBytes_GET_SIZE(peer_o);
    if (plen != PyBytes_GET_SIZE(local_o) || (plen != 4 && plen != 16)) {
        PyErr_SetString(PyExc_ValueError, "peer and local must both be IPv4 or both IPv6");
        return -1;
    }
    *peer = (const uint8_t *)PyBytes_AS_STRING(peer_o);
    *local = (const uint8_t *)PyBytes_AS_STRING(local_o);
    *v6 = plen == 16;
    return 0;
}

static void
InjectBatch_dealloc(InjectBatch *b)
{
    PyMem_RawFree(b->buf);
    PyMem_RawFree(b->pk);
    Py_TYPE(b)->tp_free((PyObject *)b);
}

static PyObject *
InjectBatch_take(InjectBatch *b, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = PyList_New((Py_ssize_t)b->n);
    if (list == NULL)
        return NULL;
    for (size_t i = 0; i < b->n; i++) {
        PyObject *o = PyBytes_FromStringAndSize((char *)b->buf + b->pk[i].off,
                                                (Py_ssize_t)b->pk[i].len);
        if (o == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, o);
    }
    batch_reset(b);
    return list;
}

#define SEND_CHUNK 64

/* Every packet to its own destination address, one sendmmsg per run of a family; no
   Python objects, so the inbound worker calls it without the GIL. */
void
batch_send(InjectBatch *b, int fd4, int fd6, Py_ssize_t *sent_out, Py_ssize_t *failed_out)
{
    struct mmsghdr msgs[SEND_CHUNK];
    struct iovec iov[SEND_CHUNK];
    union {
        struct sockaddr_in v4;
        struct sockaddr_in6 v6;
    } dst[SEND_CHUNK];
    Py_ssize_t sent = 0, failed = 0;
    size_t i = 0;
    while (i < b->n) {
        int v6 = b->pk[i].v6;
        int k = 0;
        while (i + k < b->n && k < SEND_CHUNK && b->pk[i + k].v6 == v6) {
            Pending *p = &b->pk[i + k];
            uint8_t *pkt = b->buf + p->off;
            memset(&msgs[k], 0, sizeof(msgs[k]));
            memset(&dst[k], 0, sizeof(dst[k]));
            iov[k].iov_base = pkt;
            iov[k].iov_len = p->len;
            if (v6) {
                dst[k].v6.sin6_family = AF_INET6;
                memcpy(&dst[k].v6.sin6_addr, pkt + 24, 16);
                msgs[k].msg_hdr.msg_namelen = sizeof(struct sockaddr_in6);
            } else {
                dst[k].v4.sin_family = AF_INET;
                memcpy(&dst[k].v4.sin_addr, pkt + 16, 4);
                msgs[k].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
            }
            msgs[k].msg_hdr.msg_name = &dst[k];
            msgs[k].msg_hdr.msg_iov = &iov[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
            k++;
        }
        int fd = v6 ? fd6 : fd4;
        int done = 0;
        while (done < k) {
            int r = sendmmsg(fd, msgs + done, (unsigned)(k - done), MSG_DONTWAIT);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                b->last_errno = errno;
                failed++; /* the first packet of the rest failed: skip it, go on */
                done++;
            } else {
                sent += r;
                done += r;
            }
        }
        i += (size_t)k;
    }
    b->sent += sent;
    b->failed += failed;
    batch_reset(b);
    *sent_out = sent;
    *failed_out = failed;
}

/* send(fd4, fd6) -> (sent, failed): every packet goes to its own destination address. */
static PyObject *
InjectBatch_send(InjectBatch *b, PyObject *args)
{
    int fd4, fd6;
    if (!PyArg_ParseTuple(args, "ii", &fd4, &fd6))
        return NULL;
    Py_ssize_t sent, failed;
    batch_send(b, fd4, fd6, &sent, &failed);
    return Py_BuildValue("nn", sent, failed);
}

static Py_ssize_t
InjectBatch_len(InjectBatch *b)
{
    return (Py_ssize_t)b->n;
}

static PyObject *
InjectBatch_get_errno(InjectBatch *b, void *closure)
{
    return PyLong_FromLong(b->last_errno);
}

static PyMethodDef InjectBatch_methods[] = {
    {"take", (PyCFunction)InjectBatch_take, METH_NOARGS,
     "The waiting packets as bytes, in order; the batch is emptied."},
    {"send", (PyCFunction)InjectBatch_send, METH_VARARGS,
     "send(fd4, fd6) -> (sent, failed): inject through the raw sockets; the batch is emptied."},
    {0},
};

static PyGetSetDef InjectBatch_getset[] = {
    {"last_errno", (getter)InjectBatch_get_errno, NULL, "errno of the last failed send", NULL},
    {0},
};

static PySequenceMethods InjectBatch_seq = {.sq_length = (lenfunc)InjectBatch_len};

PyTypeObject InjectBatchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tcpencap.native._fastpath.InjectBatch",
    .tp_basicsize = sizeof(InjectBatch),
    .tp_dealloc = (destructor)InjectBatch_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Packets to inject, built by Deframer.pump().",
    .tp_methods = InjectBatch_methods,
    .tp_getset = InjectBatch_getset,
    .tp_as_sequence = &InjectBatch_seq,
    .tp_new = PyType_GenericNew,
};

