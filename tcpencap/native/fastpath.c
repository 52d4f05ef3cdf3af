/*
 * The per-packet work of the RFC 9329 data path, in C.
 *
 * Python keeps every decision that is not per packet (connections, the SPI table, VICI,
 * timers); this module only repeats, packet by packet, decisions Python has already made:
 *
 *   FlowCache    charon's ESP-in-UDP packet -> the connection Python routed the same
 *                (source, destination, port, SPI) to, and its RFC 9329 frame. Python
 *                installs an entry after routing a packet itself and clears the cache
 *                whenever its table or a connection's state changes, so a hit here is
 *                exactly what the Python router would have decided. read_queue() reads a
 *                whole batch of NFQUEUE messages with one recvmmsg.
 *   Deframer     the same events as tcpencap.wire.rfc9329.StreamCodec (the reference);
 *                pump() turns the ESP frames of an open connection straight into the
 *                IP/UDP packets the router would have built, into an InjectBatch.
 *   InjectBatch  packets waiting for injection; send() hands them to the raw sockets with
 *                one sendmmsg per run of one address family.
 *
 * Everything but read_queue() and send() is pure: bytes in, bytes and counts out.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <linux/netlink.h>

#define PROTO_UDP 17
#define NATT_PORT 4500
#define LENGTH_SIZE 2
#define MAX_FRAME 0xFFFF
#define ESP_MIN_LEN 8
#define PREFIX "IKETCP"
#define PREFIX_LEN 6

/* ------------------------------------------------------------------------------------ */
/* Event objects of tcpencap.wire.rfc9329, handed over by bind_events().                 */

static PyObject *ev_need_data, *ev_keepalive, *ev_prefix_received, *ev_closed;
static PyObject *cls_ike, *cls_esp, *cls_invalid, *cls_protocol_error, *role_responder;

static PyObject *
bind_events(PyObject *mod, PyObject *args)
{
    PyObject *o[9];
    if (!PyArg_ParseTuple(args, "OOOOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                          &o[6], &o[7], &o[8]))
        return NULL;
    PyObject **slots[9] = {&ev_need_data, &ev_keepalive, &ev_prefix_received, &ev_closed,
                           &cls_ike, &cls_esp, &cls_invalid, &cls_protocol_error,
                           &role_responder};
    for (int i = 0; i < 9; i++) {
        Py_INCREF(o[i]);
        Py_XSETREF(*slots[i], o[i]);
    }
    Py_RETURN_NONE;
}

static int
events_bound(void)
{
    if (ev_need_data == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind_events() was not called");
        return 0;
    }
    return 1;
}

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

static inline void
put16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* ------------------------------------------------------------------------------------ */
/* InjectBatch                                                                            */

typedef struct {
    size_t off, len;
    uint8_t v6;
} Pending;

typedef struct {
    PyObject_HEAD
    uint8_t *buf;
    size_t len, cap;
    Pending *pk;
    size_t n, pcap;
    Py_ssize_t sent, failed; /* totals over the batch's life */
    int last_errno;
} InjectBatch;

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
static int
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
static void
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
    {NULL},
};

static PyGetSetDef InjectBatch_getset[] = {
    {"last_errno", (getter)InjectBatch_get_errno, NULL, "errno of the last failed send", NULL},
    {NULL},
};

static PySequenceMethods InjectBatch_seq = {.sq_length = (lenfunc)InjectBatch_len};

static PyTypeObject InjectBatchType = {
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

/* ------------------------------------------------------------------------------------ */
/* Deframer                                                                               */

typedef struct {
    PyObject_HEAD
    PyObject *role;
    int responder;
    int max_frame;
    int prefix_received;
    int awaiting_prefix;
    int prefix_sent;
    int eof;
    Py_ssize_t frames_in;
    uint8_t *buf;
    size_t len, cap, pos;
    PyObject *error; /* the ProtocolError every later event repeats */
    int lent;        /* the inbound worker reads into it: Python must not touch it */
} Deframer;

static int
deframer_usable(Deframer *d)
{
    if (d->lent) {
        PyErr_SetString(PyExc_RuntimeError, "the deframer is lent to the inbound worker");
        return 0;
    }
    return 1;
}

enum kind { K_NEED, K_CLOSED, K_ERROR, K_IKE, K_ESP, K_KEEPALIVE, K_INVALID };

static void
deframer_drop_buffer(Deframer *d)
{
    PyMem_RawFree(d->buf);
    d->buf = NULL;
    d->len = d->cap = d->pos = 0;
}

static PyObject *
deframer_fail(Deframer *d, const char *reason)
{
    PyObject *err = PyObject_CallFunction(cls_protocol_error, "s", reason);
    if (err == NULL)
        return NULL;
    Py_XSETREF(d->error, err);
    deframer_drop_buffer(d);
    Py_INCREF(err);
    return err;
}

static int
Deframer_init(Deframer *d, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"role", "max_frame", NULL};
    PyObject *role;
    int max_frame = MAX_FRAME;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|$i", kwlist, &role, &max_frame))
        return -1;
    if (!events_bound())
        return -1;
    if (max_frame < LENGTH_SIZE || max_frame > MAX_FRAME) {
        PyErr_Format(PyExc_ValueError, "max_frame %d outside %d..%d", max_frame, LENGTH_SIZE,
                     MAX_FRAME);
        return -1;
    }
    Py_INCREF(role);
    Py_XSETREF(d->role, role);
    d->responder = role == role_responder;
    d->max_frame = max_frame;
    d->awaiting_prefix = d->responder;
    return 0;
}

static void
Deframer_dealloc(Deframer *d)
{
    Py_XDECREF(d->role);
    Py_XDECREF(d->error);
    PyMem_RawFree(d->buf);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

static PyObject *
Deframer_receive_data(Deframer *d, PyObject *arg)
{
    if (!deframer_usable(d))
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *res = NULL;
    if (d->error != NULL) {
        res = Py_NewRef(Py_None);
        goto done;
    }
    if (view.len == 0) {
        d->eof = 1;
        res = Py_NewRef(Py_None);
        goto done;
    }
    if (d->eof) {
        PyObject *e = deframer_fail(d, "data received after EOF");
        if (e == NULL)
            goto done;
        Py_DECREF(e);
        res = Py_NewRef(Py_None);
        goto done;
    }
    if (d->pos) {
        if (d->pos >= d->len) {
            d->len = 0;
        } else {
            memmove(d->buf, d->buf + d->pos, d->len - d->pos);
            d->len -= d->pos;
        }
        d->pos = 0;
    }
    size_t need = d->len + (size_t)view.len;
    if (need > d->cap) {
        size_t ncap = d->cap ? d->cap : 4096;
        while (ncap < need)
            ncap *= 2;
        uint8_t *nb = PyMem_RawRealloc(d->buf, ncap);
        if (nb == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        d->buf = nb;
        d->cap = ncap;
    }
    memcpy(d->buf + d->len, view.buf, (size_t)view.len);
    d->len = need;
    res = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&view);
    return res;
}

/* After NeedData nothing but a partial frame is left; when nothing is, the buffer goes, so
   an idle connection holds no receive memory (the next read allocates again). */
static void
deframer_settle(Deframer *d)
{
    if (d->pos >= d->len)
        deframer_drop_buffer(d);
}

static PyObject *
deframer_prefix(Deframer *d)
{
    size_t avail = d->len - d->pos;
    size_t k = avail < PREFIX_LEN ? avail : PREFIX_LEN;
    for (size_t i = 0; i < k; i++) {
        uint8_t got = d->buf[d->pos + i];
        if (got != (uint8_t)PREFIX[i]) {
            char reason[128];
            snprintf(reason, sizeof reason,
                     "stream prefix octet %zu is 0x%02x, expected 0x%02x (b'IKETCP')", i, got,
                     (unsigned)(uint8_t)PREFIX[i]);
            return deframer_fail(d, reason);
        }
    }
    if (k < PREFIX_LEN) {
        if (!d->eof)
            return Py_NewRef(ev_need_data);
        if (avail == 0)
            return Py_NewRef(ev_closed);
        char reason[64];
        snprintf(reason, sizeof reason, "EOF after %zu of %d prefix octets", avail, PREFIX_LEN);
        return deframer_fail(d, reason);
    }
    d->pos += PREFIX_LEN;
    d->prefix_received = 1;
    d->awaiting_prefix = 0;
    return Py_NewRef(ev_prefix_received);
}

/* The next frame after the prefix: its kind, and where its payload is. *reason gets the
   text of K_ERROR and K_INVALID. */
static enum kind
deframer_frame(Deframer *d, size_t *start, size_t *n, char *reason, size_t rlen)
{
    size_t avail = d->len - d->pos;
    if (avail < LENGTH_SIZE) {
        if (!d->eof)
            return K_NEED;
        if (avail == 0)
            return K_CLOSED;
        snprintf(reason, rlen, "EOF inside a frame length");
        return K_ERROR;
    }
    const uint8_t *b = d->buf;
    size_t pos = d->pos;
    unsigned length = ((unsigned)b[pos] << 8) | b[pos + 1];
    if (length < LENGTH_SIZE) {
        snprintf(reason, rlen, "frame length %u", length);
        return K_ERROR;
    }
    if (length > (unsigned)d->max_frame) {
        snprintf(reason, rlen, "frame length %u exceeds max_frame %d", length, d->max_frame);
        return K_ERROR;
    }
    if (avail < length) {
        if (d->eof) {
            snprintf(reason, rlen, "EOF inside a %u-octet frame (%zu octets in)", length, avail);
            return K_ERROR;
        }
        return K_NEED;
    }
    d->pos = pos + length;
    d->frames_in++;
    size_t s = pos + LENGTH_SIZE;
    size_t m = length - LENGTH_SIZE;
    *start = s;
    *n = m;
    int marker = m >= 4 && b[s] == 0 && b[s + 1] == 0 && b[s + 2] == 0 && b[s + 3] == 0;
    if (m >= 5) {
        if (marker)
            return K_IKE;
        if (m < ESP_MIN_LEN) {
            snprintf(reason, rlen, "ESP packet of %zu octets, shorter than SPI + sequence", m);
            return K_INVALID;
        }
        return K_ESP;
    }
    if (m == 1) {
        if (b[s] == 0xFF)
            return K_KEEPALIVE;
        snprintf(reason, rlen, "1-octet payload %02x, not a keepalive", b[s]);
        return K_INVALID;
    }
    if (m == 0)
        snprintf(reason, rlen, "empty frame");
    else if (m == 4 && marker)
        snprintf(reason, rlen, "non-ESP marker without an IKE message");
    else
        snprintf(reason, rlen, "%zu-octet payload, too short for IKE or ESP", m);
    return K_INVALID;
}

/* The Python event of a frame that pump() does not turn into a packet itself. */
static PyObject *
deframer_event(Deframer *d, enum kind k, size_t start, size_t n, const char *reason)
{
    switch (k) {
    case K_NEED:
        deframer_settle(d);
        return Py_NewRef(ev_need_data);
    case K_CLOSED:
        return Py_NewRef(ev_closed);
    case K_ERROR:
        return deframer_fail(d, reason);
    case K_KEEPALIVE:
        return Py_NewRef(ev_keepalive);
    case K_INVALID:
        return PyObject_CallFunction(cls_invalid, "s", reason);
    case K_IKE:
    case K_ESP: {
        size_t off = k == K_IKE ? 4 : 0;
        PyObject *data = PyBytes_FromStringAndSize((char *)d->buf + start + off,
                                                   (Py_ssize_t)(n - off));
        if (data == NULL)
            return NULL;
        PyObject *ev = PyObject_CallOneArg(k == K_IKE ? cls_ike : cls_esp, data);
        Py_DECREF(data);
        return ev;
    }
    }
    Py_UNREACHABLE();
}

static PyObject *
Deframer_next_event(Deframer *d, PyObject *Py_UNUSED(ignored))
{
    if (!deframer_usable(d))
        return NULL;
    if (d->error != NULL)
        return Py_NewRef(d->error);
    if (d->awaiting_prefix)
        return deframer_prefix(d);
    size_t start = 0, n = 0;
    char reason[128];
    enum kind k = deframer_frame(d, &start, &n, reason, sizeof reason);
    return deframer_event(d, k, start, n, reason);
}

static int
addr_arg(PyObject *o, const uint8_t **p, Py_ssize_t *len)
{
    if (!PyBytes_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "addresses must be bytes");
        return -1;
    }
    *p = (const uint8_t *)PyBytes_AS_STRING(o);
    *len = PyBytes_GET_SIZE(o);
    return 0;
}

/* pump(batch, peer, local, sport, dport) -> (event, esp_frames): every ESP frame up to the
   next other event becomes a packet in batch; that event is returned as next_event() would. */
static PyObject *
Deframer_pump(Deframer *d, PyObject *args)
{
    if (!deframer_usable(d))
        return NULL;
    PyObject *batch, *peer_o, *local_o;
    unsigned int sport, dport;
    if (!PyArg_ParseTuple(args, "O!OOII", &InjectBatchType, &batch, &peer_o, &local_o, &sport,
                          &dport))
        return NULL;
    const uint8_t *peer, *local;
    Py_ssize_t plen, llen;
    if (addr_arg(peer_o, &peer, &plen) < 0 || addr_arg(local_o, &local, &llen) < 0)
        return NULL;
    if (plen != llen || (plen != 4 && plen != 16)) {
        PyErr_SetString(PyExc_ValueError, "peer and local must both be IPv4 or both IPv6");
        return NULL;
    }
    int v6 = plen == 16;
    Py_ssize_t esp = 0;
    PyObject *ev;
    if (d->error != NULL) {
        ev = Py_NewRef(d->error);
    } else if (d->awaiting_prefix) {
        ev = deframer_prefix(d);
    } else {
        for (;;) {
            size_t start = 0, n = 0;
            char reason[128];
            enum kind k = deframer_frame(d, &start, &n, reason, sizeof reason);
            if (k == K_ESP) {
                if (batch_add((InjectBatch *)batch, peer, local, v6, sport, dport,
                              d->buf + start, n) < 0)
                    return PyErr_NoMemory();
                esp++;
                continue;
            }
            ev = deframer_event(d, k, start, n, reason);
            break;
        }
    }
    if (ev == NULL)
        return NULL;
    PyObject *res = Py_BuildValue("Nn", ev, esp);
    return res;
}

static PyObject *
Deframer_send_prefix(Deframer *d, PyObject *Py_UNUSED(ignored))
{
    if (d->responder) {
        PyErr_SetString(PyExc_ValueError, "only the TCP Originator sends the stream prefix");
        return NULL;
    }
    if (d->prefix_sent) {
        PyErr_SetString(PyExc_ValueError, "stream prefix already sent on this connection");
        return NULL;
    }
    d->prefix_sent = 1;
    return PyBytes_FromStringAndSize(PREFIX, PREFIX_LEN);
}

static PyObject *
Deframer_get_prefix_received(Deframer *d, void *c)
{
    return PyBool_FromLong(d->prefix_received);
}

static PyObject *
Deframer_get_frames_in(Deframer *d, void *c)
{
    return PyLong_FromSsize_t(d->frames_in);
}

static PyObject *
Deframer_get_bytes_buffered(Deframer *d, void *c)
{
    return PyLong_FromSize_t(d->len - d->pos);
}

static PyObject *
Deframer_get_role(Deframer *d, void *c)
{
    return Py_NewRef(d->role ? d->role : Py_None);
}

static PyObject *
Deframer_get_max_frame(Deframer *d, void *c)
{
    return PyLong_FromLong(d->max_frame);
}

static PyObject *
Deframer_get_allocated(Deframer *d, void *c)
{
    return PyLong_FromSize_t(d->cap);
}

static PyMethodDef Deframer_methods[] = {
    {"receive_data", (PyCFunction)Deframer_receive_data, METH_O,
     "Append received octets; b'' marks EOF."},
    {"next_event", (PyCFunction)Deframer_next_event, METH_NOARGS,
     "The next event, as StreamCodec.next_event."},
    {"pump", (PyCFunction)Deframer_pump, METH_VARARGS,
     "pump(batch, peer, local, sport, dport) -> (event, esp_frames)."},
    {"send_prefix", (PyCFunction)Deframer_send_prefix, METH_NOARGS, "The IKETCP prefix, once."},
    {NULL},
};

static PyGetSetDef Deframer_getset[] = {
    {"prefix_received", (getter)Deframer_get_prefix_received, NULL, NULL, NULL},
    {"frames_in", (getter)Deframer_get_frames_in, NULL, NULL, NULL},
    {"bytes_buffered", (getter)Deframer_get_bytes_buffered, NULL, NULL, NULL},
    {"role", (getter)Deframer_get_role, NULL, NULL, NULL},
    {"max_frame", (getter)Deframer_get_max_frame, NULL, NULL, NULL},
    {"allocated", (getter)Deframer_get_allocated, NULL, "octets of receive buffer held", NULL},
    {NULL},
};

static PyTypeObject DeframerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tcpencap.native._fastpath.Deframer",
    .tp_basicsize = sizeof(Deframer),
    .tp_dealloc = (destructor)Deframer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "RFC 9329 receive side with StreamCodec's events, and pump().",
    .tp_methods = Deframer_methods,
    .tp_getset = Deframer_getset,
    .tp_init = (initproc)Deframer_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------------------------ */
/* TcpWriter                                                                              */
/* The send side of one RFC 9329 connection: Python's frames (IKE, misses) and the flow     */
/* cache's hits share one buffer, so they leave in the order they were written. The queue  */
/* workers write without the GIL, so every access holds the writer's mutex.                */

#define IKE_HARD_LIMIT_FACTOR 4 /* IKE may overshoot the buffer bound this many times */

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    int ready; /* mu is initialised */
    int fd;    /* -1: detached, or collecting for take() when collect is set */
    int collect;
    size_t limit;
    uint8_t *buf;
    size_t len, cap, pos;
    Py_ssize_t direct_frames, direct_bytes; /* written by the flow cache, not by Python */
    Py_ssize_t esp_dropped, ike_dropped;
    int error; /* errno of a failed send: the connection is broken, writes are dropped */
} TcpWriter;

static int
writer_room(TcpWriter *w, size_t n)
{
    if (w->pos && w->pos == w->len)
        w->pos = w->len = 0;
    if (w->len + n <= w->cap)
        return 0;
    if (w->pos) { /* move the unsent rest to the front before growing */
        memmove(w->buf, w->buf + w->pos, w->len - w->pos);
        w->len -= w->pos;
        w->pos = 0;
        if (w->len + n <= w->cap)
            return 0;
    }
    size_t ncap = w->cap ? w->cap : 4096;
    while (ncap < w->len + n)
        ncap *= 2;
    uint8_t *nb = realloc(w->buf, ncap); /* not PyMem: workers call this without the GIL */
    if (nb == NULL)
        return -1;
    w->buf = nb;
    w->cap = ncap;
    return 0;
}

/* May this frame be queued? ESP is dropped over the bound, IKE only far over it. */
static int
writer_admit(TcpWriter *w, int is_ike, Py_ssize_t frames)
{
    size_t queued = w->len - w->pos;
    if (w->error) {
        if (is_ike)
            w->ike_dropped++;
        else
            w->esp_dropped += frames;
        return 0;
    }
    if (queued > w->limit) {
        if (!is_ike) {
            w->esp_dropped += frames;
            return 0;
        }
        if (queued > w->limit * IKE_HARD_LIMIT_FACTOR) {
            w->ike_dropped++;
            return 0;
        }
    }
    return 1;
}

static void
writer_forget(TcpWriter *w)
{
    free(w->buf);
    w->buf = NULL;
    w->pos = w->len = w->cap = 0;
}

static void
writer_flush(TcpWriter *w)
{
    if (w->fd < 0 || w->collect || w->error)
        return;
    while (w->pos < w->len) {
        ssize_t r = send(w->fd, w->buf + w->pos, w->len - w->pos, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r > 0) {
            w->pos += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        w->error = r < 0 ? errno : EPIPE;
        break;
    }
    writer_forget(w); /* all sent (or broken): an idle connection keeps no send memory */
}

/* Queue data (sent first straight from the caller's octets when nothing waits). */
static int
writer_put(TcpWriter *w, const uint8_t *src, size_t n)
{
    if (w->pos == w->len && w->fd >= 0 && !w->collect) {
        while (n) {
            ssize_t r = send(w->fd, src, n, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (r > 0) {
                src += r;
                n -= (size_t)r;
            } else if (r < 0 && errno == EINTR) {
                continue;
            } else {
                if (!(r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))) {
                    w->error = r < 0 ? errno : EPIPE;
                    return 0;
                }
                break;
            }
        }
    }
    if (n) {
        if (writer_room(w, n) < 0)
            return -1;
        memcpy(w->buf + w->len, src, n);
        w->len += n;
    }
    return 0;
}

static int
TcpWriter_init(TcpWriter *w, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "limit", NULL};
    int fd;
    Py_ssize_t limit;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "in", kwlist, &fd, &limit))
        return -1;
    if (limit < 0) {
        PyErr_SetString(PyExc_ValueError, "limit must not be negative");
        return -1;
    }
    if (!w->ready) {
        pthread_mutex_init(&w->mu, NULL);
        w->ready = 1;
    }
    w->fd = fd;
    w->collect = fd < 0;
    w->limit = (size_t)limit;
    return 0;
}

static void
TcpWriter_dealloc(TcpWriter *w)
{
    free(w->buf);
    if (w->ready)
        pthread_mutex_destroy(&w->mu);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static int
writer_lock(TcpWriter *w)
{
    if (!w->ready) {
        PyErr_SetString(PyExc_RuntimeError, "TcpWriter.__init__ was not called");
        return -1;
    }
    pthread_mutex_lock(&w->mu);
    return 0;
}

/* write(data, is_ike=False, frames=1) -> bool: queued (and sent as far as the socket
   takes it) or dropped by the bound. */
static PyObject *
TcpWriter_write(TcpWriter *w, PyObject *args)
{
    Py_buffer view;
    int is_ike = 0;
    Py_ssize_t frames = 1;
    if (!PyArg_ParseTuple(args, "y*|pn", &view, &is_ike, &frames))
        return NULL;
    if (writer_lock(w) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    int ok = writer_admit(w, is_ike, frames);
    int err = ok ? writer_put(w, view.buf, (size_t)view.len) : 0;
    pthread_mutex_unlock(&w->mu);
    PyBuffer_Release(&view);
    if (err < 0)
        return PyErr_NoMemory();
    return PyBool_FromLong(ok);
}

static PyObject *
TcpWriter_flush(TcpWriter *w, PyObject *Py_UNUSED(ignored))
{
    if (writer_lock(w) < 0)
        return NULL;
    writer_flush(w);
    size_t left = w->len - w->pos;
    pthread_mutex_unlock(&w->mu);
    return PyLong_FromSize_t(left);
}

static PyObject *
TcpWriter_take(TcpWriter *w, PyObject *Py_UNUSED(ignored))
{
    if (writer_lock(w) < 0)
        return NULL;
    PyObject *b = PyBytes_FromStringAndSize((char *)w->buf + w->pos, (Py_ssize_t)(w->len - w->pos));
    if (b != NULL)
        writer_forget(w);
    pthread_mutex_unlock(&w->mu);
    return b;
}

static PyObject *
TcpWriter_close(TcpWriter *w, PyObject *Py_UNUSED(ignored))
{
    if (writer_lock(w) < 0)
        return NULL;
    w->fd = -1;
    w->collect = 0;
    if (!w->error)
        w->error = EBADF; /* later writes are dropped and counted */
    writer_forget(w);
    pthread_mutex_unlock(&w->mu);
    Py_RETURN_NONE;
}

#define WRITER_GETTER(name, expr)                                                            \
    static PyObject *TcpWriter_get_##name(TcpWriter *w, void *c)                             \
    {                                                                                        \
        if (writer_lock(w) < 0)                                                              \
            return NULL;                                                                     \
        PyObject *v = expr;                                                                  \
        pthread_mutex_unlock(&w->mu);                                                        \
        return v;                                                                            \
    }

WRITER_GETTER(pending, PyLong_FromSize_t(w->len - w->pos))
WRITER_GETTER(fd, PyLong_FromLong(w->fd))
WRITER_GETTER(error, PyLong_FromLong(w->error))
WRITER_GETTER(direct_frames, PyLong_FromSsize_t(w->direct_frames))
WRITER_GETTER(direct_bytes, PyLong_FromSsize_t(w->direct_bytes))
WRITER_GETTER(esp_dropped, PyLong_FromSsize_t(w->esp_dropped))
WRITER_GETTER(ike_dropped, PyLong_FromSsize_t(w->ike_dropped))

static PyMethodDef TcpWriter_methods[] = {
    {"write", (PyCFunction)TcpWriter_write, METH_VARARGS,
     "write(data, is_ike=False, frames=1) -> bool: queued, or dropped by the bound."},
    {"flush", (PyCFunction)TcpWriter_flush, METH_NOARGS, "Send what the socket takes; -> pending."},
    {"take", (PyCFunction)TcpWriter_take, METH_NOARGS, "The queued octets (fd -1: tests)."},
    {"close", (PyCFunction)TcpWriter_close, METH_NOARGS, "Forget the socket and the queue."},
    {NULL},
};

static PyGetSetDef TcpWriter_getset[] = {
    {"pending", (getter)TcpWriter_get_pending, NULL, "octets queued, not yet sent", NULL},
    {"fd", (getter)TcpWriter_get_fd, NULL, NULL, NULL},
    {"error", (getter)TcpWriter_get_error, NULL, "errno of the send that broke it", NULL},
    {"direct_frames", (getter)TcpWriter_get_direct_frames, NULL, NULL, NULL},
    {"direct_bytes", (getter)TcpWriter_get_direct_bytes, NULL, NULL, NULL},
    {"esp_dropped", (getter)TcpWriter_get_esp_dropped, NULL, NULL, NULL},
    {"ike_dropped", (getter)TcpWriter_get_ike_dropped, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject TcpWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tcpencap.native._fastpath.TcpWriter",
    .tp_basicsize = sizeof(TcpWriter),
    .tp_dealloc = (destructor)TcpWriter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "TcpWriter(fd, limit): one connection's send buffer, shared with the flow cache.",
    .tp_methods = TcpWriter_methods,
    .tp_getset = TcpWriter_getset,
    .tp_init = (initproc)TcpWriter_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------------------------ */
/* FlowCache                                                                              */

typedef struct {
    uint8_t used, v6;
    uint16_t dport;
    uint32_t spi;
    uint8_t src[16], dst[16];
} FlowKey;

typedef struct {
    FlowKey key;
    uint32_t conn_id;
} Flow;

typedef struct {
    uint32_t conn_id; /* 0: empty */
    TcpWriter *writer; /* strong reference, taken and released with the GIL */
} WriterSlot;

#define FLOW_MAX (1u << 17)
#define WRITER_MAX (1u << 20)
#define QUEUE_BATCH 64
#define QUEUE_BUF (65536 + 1024)

/* Flows and writers are read by the queue workers without the GIL (read lock) and changed
   by Python with it (write lock); no thread holding the lock ever waits for the GIL. */
typedef struct {
    PyObject_HEAD
    pthread_rwlock_t lock;
    int ready; /* lock is initialised */
    Flow *flows;
    size_t cap, count;
    WriterSlot *writers;
    size_t wcap, wcount;
    Py_ssize_t hits, misses, refused, direct; /* updated atomically */
    Py_ssize_t seq;  /* of read_queue's verdict messages */
    uint8_t *qbuf;   /* QUEUE_BATCH receive buffers for read_queue() */
} FlowCache;

#define ADD(field, n) __atomic_fetch_add(&(field), (n), __ATOMIC_RELAXED)

/* The conditions of Router.outbound's fast path, octet for octet: ESP-in-UDP from port
   4500, IPv4 without options or fragments or IPv6 without extension headers. */
static int
flow_key(const uint8_t *p, size_t len, FlowKey *k, size_t *esp_at, size_t *total)
{
    memset(k, 0, sizeof *k);
    k->used = 1;
    if (len >= 36 && p[0] == 0x45 && p[9] == PROTO_UDP && p[20] == (NATT_PORT >> 8) &&
        p[21] == (NATT_PORT & 0xFF) && !((p[6] & 0x3F) || p[7]) &&
        (p[28] | p[29] | p[30] | p[31]) != 0) {
        size_t t = ((size_t)p[2] << 8) | p[3];
        if (t < 36 || t > len)
            return 0;
        k->v6 = 0;
        memcpy(k->src, p + 12, 4);
        memcpy(k->dst, p + 16, 4);
        k->dport = (uint16_t)((p[22] << 8) | p[23]);
        k->spi = ((uint32_t)p[28] << 24) | ((uint32_t)p[29] << 16) | ((uint32_t)p[30] << 8) | p[31];
        *esp_at = 28;
        *total = t;
        return 1;
    }
    if (len >= 56 && (p[0] >> 4) == 6 && p[6] == PROTO_UDP && p[40] == (NATT_PORT >> 8) &&
        p[41] == (NATT_PORT & 0xFF) && (p[48] | p[49] | p[50] | p[51]) != 0) {
        size_t t = 40 + (((size_t)p[4] << 8) | p[5]);
        if (t < 56 || t > len)
            return 0;
        k->v6 = 1;
        memcpy(k->src, p + 8, 16);
        memcpy(k->dst, p + 24, 16);
        k->dport = (uint16_t)((p[42] << 8) | p[43]);
        k->spi = ((uint32_t)p[48] << 24) | ((uint32_t)p[49] << 16) | ((uint32_t)p[50] << 8) | p[51];
        *esp_at = 48;
        *total = t;
        return 1;
    }
    return 0;
}

static size_t
flow_hash(const FlowKey *k)
{
    const uint8_t *p = (const uint8_t *)k;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < sizeof *k; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return (size_t)(h ^ (h >> 29));
}

static Flow *
flow_find(FlowCache *c, const FlowKey *k)
{
    if (c->cap == 0)
        return NULL;
    size_t mask = c->cap - 1;
    for (size_t i = flow_hash(k) & mask;; i = (i + 1) & mask) {
        Flow *f = &c->flows[i];
        if (!f->key.used)
            return NULL;
        if (memcmp(&f->key, k, sizeof *k) == 0)
            return f;
    }
}

static int
flow_grow(FlowCache *c)
{
    size_t ncap = c->cap ? c->cap * 2 : 64;
    Flow *nf = calloc(ncap, sizeof(Flow));
    if (nf == NULL)
        return -1;
    for (size_t i = 0; i < c->cap; i++) {
        Flow *f = &c->flows[i];
        if (!f->key.used)
            continue;
        size_t j = flow_hash(&f->key) & (ncap - 1);
        while (nf[j].key.used)
            j = (j + 1) & (ncap - 1);
        nf[j] = *f;
    }
    free(c->flows);
    c->flows = nf;
    c->cap = ncap;
    return 0;
}

static size_t
writer_hash(uint32_t conn_id)
{
    return (size_t)((conn_id * 2654435761u) >> 7);
}

static TcpWriter *
writer_find(FlowCache *c, uint32_t conn_id)
{
    if (c->wcap == 0)
        return NULL;
    size_t mask = c->wcap - 1;
    for (size_t i = writer_hash(conn_id) & mask;; i = (i + 1) & mask) {
        if (c->writers[i].conn_id == 0)
            return NULL;
        if (c->writers[i].conn_id == conn_id)
            return c->writers[i].writer;
    }
}

/* Rebuild the writer table at ncap, leaving out conn_id skip (0: none): linear probing
   has no cheap deletion, and writers change only when connections come and go. */
static int
writers_rebuild(FlowCache *c, size_t ncap, uint32_t skip, TcpWriter **dropped)
{
    WriterSlot *nw = calloc(ncap, sizeof(WriterSlot));
    if (nw == NULL)
        return -1;
    size_t n = 0;
    for (size_t i = 0; i < c->wcap; i++) {
        WriterSlot *s = &c->writers[i];
        if (s->conn_id == 0)
            continue;
        if (s->conn_id == skip) {
            *dropped = s->writer;
            continue;
        }
        size_t j = writer_hash(s->conn_id) & (ncap - 1);
        while (nw[j].conn_id)
            j = (j + 1) & (ncap - 1);
        nw[j] = *s;
        n++;
    }
    free(c->writers);
    c->writers = nw;
    c->wcap = ncap;
    c->wcount = n;
    return 0;
}

static int
FlowCache_init(FlowCache *c, PyObject *args, PyObject *kw)
{
    if (!PyArg_ParseTuple(args, ""))
        return -1;
    if (!c->ready) {
        pthread_rwlock_init(&c->lock, NULL);
        c->ready = 1;
    }
    return 0;
}

static void
FlowCache_dealloc(FlowCache *c)
{
    for (size_t i = 0; i < c->wcap; i++)
        Py_XDECREF(c->writers[i].writer);
    free(c->writers);
    free(c->flows);
    PyMem_Free(c->qbuf);
    if (c->ready)
        pthread_rwlock_destroy(&c->lock);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

/* Take the write lock without holding the GIL while waiting: a worker that holds the read
   lock never waits for the GIL, so this cannot deadlock, and the GIL is not blocked. */
static void
cache_wrlock(FlowCache *c)
{
    if (pthread_rwlock_trywrlock(&c->lock) == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&c->lock);
    Py_END_ALLOW_THREADS
}

static PyObject *
FlowCache_clear(FlowCache *c, PyObject *Py_UNUSED(ignored))
{
    cache_wrlock(c);
    if (c->count) {
        if (c->cap > 1024) { /* shrink back after a burst of flows */
            free(c->flows);
            c->flows = NULL;
            c->cap = 0;
        } else {
            memset(c->flows, 0, c->cap * sizeof(Flow));
        }
        c->count = 0;
    }
    pthread_rwlock_unlock(&c->lock);
    Py_RETURN_NONE;
}

/* install(packet, conn_id) -> bool: packets like this one now go to conn_id. */
static PyObject *
FlowCache_install(FlowCache *c, PyObject *args)
{
    Py_buffer view;
    unsigned int conn_id;
    if (!PyArg_ParseTuple(args, "y*I", &view, &conn_id))
        return NULL;
    FlowKey k;
    size_t esp_at, total;
    int ok = flow_key(view.buf, (size_t)view.len, &k, &esp_at, &total);
    PyBuffer_Release(&view);
    if (!ok)
        Py_RETURN_FALSE;
    cache_wrlock(c);
    int res = 1;
    Flow *f = flow_find(c, &k);
    if (f != NULL) {
        f->conn_id = conn_id;
    } else if (c->count >= FLOW_MAX) {
        ADD(c->refused, 1);
        res = 0;
    } else if ((c->count + 1) * 2 > c->cap && flow_grow(c) < 0) {
        res = -1;
    } else {
        size_t mask = c->cap - 1;
        size_t i = flow_hash(&k) & mask;
        while (c->flows[i].key.used)
            i = (i + 1) & mask;
        c->flows[i].key = k;
        c->flows[i].conn_id = conn_id;
        c->count++;
    }
    pthread_rwlock_unlock(&c->lock);
    if (res < 0)
        return PyErr_NoMemory();
    return PyBool_FromLong(res);
}

/* set_writer(conn_id, writer): hits for conn_id are written by C from now on. */
static PyObject *
FlowCache_set_writer(FlowCache *c, PyObject *args)
{
    unsigned int conn_id;
    PyObject *w;
    if (!PyArg_ParseTuple(args, "IO!", &conn_id, &TcpWriterType, &w))
        return NULL;
    if (conn_id == 0) {
        PyErr_SetString(PyExc_ValueError, "connection id 0 is not a connection");
        return NULL;
    }
    TcpWriter *old = NULL;
    cache_wrlock(c);
    int res = 0;
    if (writer_find(c, conn_id) != NULL)
        res = writers_rebuild(c, c->wcap, conn_id, &old);
    if (res == 0 && (c->wcount + 1) * 2 > c->wcap)
        res = c->wcount >= WRITER_MAX ? -2 : writers_rebuild(c, c->wcap ? c->wcap * 2 : 64, 0, &old);
    if (res == 0) {
        size_t mask = c->wcap - 1;
        size_t i = writer_hash(conn_id) & mask;
        while (c->writers[i].conn_id)
            i = (i + 1) & mask;
        Py_INCREF(w);
        c->writers[i].conn_id = conn_id;
        c->writers[i].writer = (TcpWriter *)w;
        c->wcount++;
    }
    pthread_rwlock_unlock(&c->lock);
    Py_XDECREF(old);
    if (res == -1)
        return PyErr_NoMemory();
    if (res == -2) {
        PyErr_SetString(PyExc_OverflowError, "too many writers");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
FlowCache_drop_writer(FlowCache *c, PyObject *arg)
{
    unsigned long conn_id = PyLong_AsUnsignedLong(arg);
    if (conn_id == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    TcpWriter *old = NULL;
    cache_wrlock(c);
    int res = 0;
    if (writer_find(c, (uint32_t)conn_id) != NULL)
        res = writers_rebuild(c, c->wcap, (uint32_t)conn_id, &old);
    pthread_rwlock_unlock(&c->lock);
    Py_XDECREF(old); /* after the unlock: no worker can still be using it */
    if (res < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

typedef struct {
    const uint8_t *p;
    size_t esp_at, total;
    int slot; /* -1: not a hit */
} Classified;

typedef struct {
    uint32_t conn_id;
    size_t bytes;
    Py_ssize_t frames;
    int direct; /* written by the connection's writer */
    PyObject *data;
    size_t fill;
} Slot;

/* Without the GIL: sort packets into hits (per connection, in arrival order) and misses,
   and write the hits of connections with a writer. stalled gets the conn ids whose writer
   kept octets the socket did not take. -> 0, or -1 when out of memory. */
static int
classify_direct(FlowCache *c, Classified *pk, size_t n, Slot *slots, size_t *nslots,
                uint32_t *stalled, size_t *nstalled)
{
    int res = 0;
    *nslots = 0;
    *nstalled = 0;
    pthread_rwlock_rdlock(&c->lock);
    for (size_t i = 0; i < n; i++) {
        pk[i].slot = -1;
        if (pk[i].p == NULL)
            continue;
        FlowKey k;
        Flow *f = NULL;
        if (flow_key(pk[i].p, pk[i].total, &k, &pk[i].esp_at, &pk[i].total))
            f = flow_find(c, &k);
        if (f == NULL) {
            ADD(c->misses, 1);
            continue;
        }
        ADD(c->hits, 1);
        size_t s = 0;
        while (s < *nslots && slots[s].conn_id != f->conn_id)
            s++;
        if (s == *nslots) {
            memset(&slots[s], 0, sizeof slots[s]);
            slots[s].conn_id = f->conn_id;
            (*nslots)++;
        }
        slots[s].bytes += LENGTH_SIZE + pk[i].total - pk[i].esp_at;
        slots[s].frames++;
        pk[i].slot = (int)s;
    }
    for (size_t s = 0; s < *nslots; s++) {
        TcpWriter *w = writer_find(c, slots[s].conn_id);
        if (w == NULL)
            continue;
        slots[s].direct = 1;
        pthread_mutex_lock(&w->mu);
        for (size_t i = 0; i < n; i++) {
            if (pk[i].slot != (int)s || !writer_admit(w, 0, 1))
                continue;
            size_t m = pk[i].total - pk[i].esp_at;
            if (writer_room(w, LENGTH_SIZE + m) < 0) {
                res = -1;
                break;
            }
            uint8_t *out = w->buf + w->len;
            put16(out, (uint32_t)(m + LENGTH_SIZE));
            memcpy(out + LENGTH_SIZE, pk[i].p + pk[i].esp_at, m);
            w->len += LENGTH_SIZE + m;
            w->direct_frames++;
            w->direct_bytes += (Py_ssize_t)(LENGTH_SIZE + m);
            ADD(c->direct, 1);
        }
        writer_flush(w);
        if (w->len > w->pos)
            stalled[(*nstalled)++] = slots[s].conn_id;
        pthread_mutex_unlock(&w->mu);
    }
    pthread_rwlock_unlock(&c->lock);
    return res;
}

/* With the GIL: the hits of connections without writer, framed into one bytes each. */
static int
classify_collect(Classified *pk, size_t n, Slot *slots, size_t nslots)
{
    for (size_t s = 0; s < nslots; s++) {
        if (slots[s].direct)
            continue;
        slots[s].data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)slots[s].bytes);
        if (slots[s].data == NULL)
            return -1;
    }
    for (size_t i = 0; i < n; i++) {
        if (pk[i].slot < 0 || slots[pk[i].slot].direct)
            continue;
        Slot *sl = &slots[pk[i].slot];
        size_t m = pk[i].total - pk[i].esp_at;
        uint8_t *out = (uint8_t *)PyBytes_AS_STRING(sl->data) + sl->fill;
        put16(out, (uint32_t)(m + LENGTH_SIZE));
        memcpy(out + LENGTH_SIZE, pk[i].p + pk[i].esp_at, m);
        sl->fill += LENGTH_SIZE + m;
    }
    return 0;
}

static PyObject *
slots_list(Slot *slots, size_t nslots)
{
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    for (size_t s = 0; s < nslots; s++) {
        if (slots[s].data == NULL)
            continue; /* written by its connection's writer */
        PyObject *t = Py_BuildValue("INn", slots[s].conn_id, slots[s].data, slots[s].frames);
        slots[s].data = NULL;
        if (t == NULL || PyList_Append(list, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(t);
    }
    return list;
}

static void
slots_free(Slot *slots, size_t nslots)
{
    for (size_t s = 0; s < nslots; s++)
        Py_CLEAR(slots[s].data);
}

static PyObject *
id_list(const uint32_t *ids, size_t n)
{
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLong(ids[i]);
        if (v == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, v);
    }
    return list;
}

/* classify(packets) -> (misses: list[int], hits: list[(conn_id, frames_bytes, frames)]) */
static PyObject *
FlowCache_classify(FlowCache *c, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "classify() takes a sequence of bytes");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Classified *pk = PyMem_Calloc((size_t)n + 1, sizeof(Classified));
    Slot *slots = PyMem_Calloc((size_t)n + 1, sizeof(Slot));
    uint32_t *stalled = PyMem_Calloc((size_t)n + 1, sizeof(uint32_t));
    PyObject *res = NULL, *misses = NULL, *hits = NULL;
    size_t nslots = 0, nstalled = 0;
    if (pk == NULL || slots == NULL || stalled == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyBytes_Check(o)) {
            PyErr_SetString(PyExc_TypeError, "packets must be bytes");
            goto done;
        }
        pk[i].p = (const uint8_t *)PyBytes_AS_STRING(o);
        pk[i].total = (size_t)PyBytes_GET_SIZE(o);
    }
    if (classify_direct(c, pk, (size_t)n, slots, &nslots, stalled, &nstalled) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (classify_collect(pk, (size_t)n, slots, nslots) < 0)
        goto done;
    misses = PyList_New(0);
    if (misses == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (pk[i].slot >= 0)
            continue;
        PyObject *idx = PyLong_FromSsize_t(i);
        if (idx == NULL || PyList_Append(misses, idx) < 0) {
            Py_XDECREF(idx);
            goto done;
        }
        Py_DECREF(idx);
    }
    hits = slots_list(slots, nslots);
    if (hits == NULL)
        goto done;
    res = PyTuple_Pack(2, misses, hits);
done:
    Py_XDECREF(misses);
    Py_XDECREF(hits);
    if (slots != NULL)
        slots_free(slots, nslots);
    PyMem_Free(stalled);
    PyMem_Free(slots);
    PyMem_Free(pk);
    Py_DECREF(seq);
    return res;
}

#define NFNL_SUBSYS_QUEUE 3
#define NFQNL_MSG_PACKET 0
#define NFQA_PACKET_HDR 1
#define NFQA_PAYLOAD 10
#define NLA_TYPE_MASK_ ((uint16_t)~((1 << 15) | (1 << 14)))

/* One queued packet out of a netlink datagram: its id and payload. */
static int
nfq_packet(const uint8_t *d, size_t len, uint32_t *id, const uint8_t **payload, size_t *plen)
{
    while (len >= sizeof(struct nlmsghdr)) {
        const struct nlmsghdr *nh = (const struct nlmsghdr *)d;
        size_t mlen = nh->nlmsg_len;
        if (mlen < sizeof(struct nlmsghdr) || mlen > len)
            return 0;
        if (nh->nlmsg_type == ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET) &&
            mlen >= NLMSG_HDRLEN + 4) {
            const uint8_t *a = d + NLMSG_HDRLEN + 4; /* after struct nfgenmsg */
            size_t alen = mlen - NLMSG_HDRLEN - 4;
            int have_id = 0;
            *payload = NULL;
            *plen = 0;
            while (alen >= 4) {
                uint16_t al, at;
                memcpy(&al, a, 2);
                memcpy(&at, a + 2, 2);
                if (al < 4 || al > alen)
                    break;
                at &= NLA_TYPE_MASK_;
                if (at == NFQA_PACKET_HDR && al >= 8) {
                    *id = ((uint32_t)a[4] << 24) | ((uint32_t)a[5] << 16) |
                          ((uint32_t)a[6] << 8) | a[7];
                    have_id = 1;
                } else if (at == NFQA_PAYLOAD) {
                    *payload = a + 4;
                    *plen = al - 4u;
                }
                size_t step = NLA_ALIGN(al);
                if (step > alen)
                    break;
                a += step;
                alen -= step;
            }
            if (have_id)
                return 1; /* the kernel sends one packet per datagram */
        }
        size_t step = NLMSG_ALIGN(mlen);
        if (step > len)
            break;
        d += step;
        len -= step;
    }
    return 0;
}

/* NFQNL_MSG_VERDICT_BATCH: NF_DROP for every packet of the queue up to last_id (the same
   message as nfq.verdict.verdict_batch). -> 0 or errno. */
static int
verdict_batch(int fd, int queue_num, uint32_t last_id, uint32_t seq)
{
    uint8_t msg[NLMSG_HDRLEN + 4 + 4 + 8];
    struct nlmsghdr nh = {.nlmsg_len = sizeof msg,
                          .nlmsg_type = (NFNL_SUBSYS_QUEUE << 8) | 3,
                          .nlmsg_flags = NLM_F_REQUEST,
                          .nlmsg_seq = seq};
    memcpy(msg, &nh, sizeof nh);
    uint8_t *b = msg + NLMSG_HDRLEN;
    b[0] = 0; /* AF_UNSPEC */
    b[1] = 0; /* NFNETLINK_V0 */
    put16(b + 2, (uint32_t)queue_num);
    uint16_t al = 12, at = 2; /* NFQA_VERDICT_HDR */
    memcpy(b + 4, &al, 2);
    memcpy(b + 6, &at, 2);
    memset(b + 8, 0, 4); /* NF_DROP */
    b[12] = (uint8_t)(last_id >> 24);
    b[13] = (uint8_t)(last_id >> 16);
    b[14] = (uint8_t)(last_id >> 8);
    b[15] = (uint8_t)last_id;
    for (int attempt = 0; attempt < 3; attempt++) {
        if (send(fd, msg, sizeof msg, MSG_DONTWAIT) == (ssize_t)sizeof msg)
            return 0;
        if (errno != EINTR && errno != ENOBUFS && errno != EAGAIN)
            break;
    }
    return errno ? errno : EIO;
}

/* One read of the queue, without the GIL: recvmmsg, classify, write, verdict. */
typedef struct {
    int r;          /* messages read, or -1 with err */
    int err;
    long overruns;
    long long last_id;
    size_t n;       /* packets among them */
    Classified pk[QUEUE_BATCH];
    Slot slots[QUEUE_BATCH];
    size_t nslots;
    uint32_t stalled[QUEUE_BATCH];
    size_t nstalled;
    int verdict_errno;
    int nomem;
} Round;

static void
queue_round(FlowCache *c, int fd, int queue_num, uint8_t *qbuf, uint32_t seq, int flags,
            Round *rd)
{
    struct mmsghdr msgs[QUEUE_BATCH];
    struct iovec iov[QUEUE_BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < QUEUE_BATCH; i++) {
        iov[i].iov_base = qbuf + (size_t)i * QUEUE_BUF;
        iov[i].iov_len = QUEUE_BUF;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    rd->overruns = 0;
    rd->err = 0;
    rd->last_id = -1;
    rd->n = rd->nslots = rd->nstalled = 0;
    rd->verdict_errno = 0;
    rd->nomem = 0;
    int r;
    for (;;) {
        r = recvmmsg(fd, msgs, QUEUE_BATCH, flags, NULL);
        if (r >= 0)
            break;
        if (errno == EINTR)
            continue;
        if (errno == ENOBUFS) { /* the kernel dropped queued packets: go on reading */
            rd->overruns++;
            if (rd->overruns < 4)
                continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
            r = 0;
            break;
        }
        rd->err = errno;
        rd->r = -1;
        return;
    }
    rd->r = r;
    for (int i = 0; i < r; i++) {
        uint32_t id = 0;
        const uint8_t *payload;
        size_t plen;
        if (msgs[i].msg_hdr.msg_flags & MSG_TRUNC)
            continue;
        if (!nfq_packet(qbuf + (size_t)i * QUEUE_BUF, msgs[i].msg_len, &id, &payload, &plen))
            continue;
        if ((long long)id > rd->last_id)
            rd->last_id = id;
        rd->pk[rd->n].p = payload; /* NULL (no payload attribute) stays a miss */
        rd->pk[rd->n].total = plen;
        rd->n++;
    }
    if (classify_direct(c, rd->pk, rd->n, rd->slots, &rd->nslots, rd->stalled, &rd->nstalled) < 0)
        rd->nomem = 1;
    if (queue_num >= 0 && rd->last_id >= 0)
        rd->verdict_errno = verdict_batch(fd, queue_num, (uint32_t)rd->last_id, seq);
}

/* With the GIL: the round as read_queue()'s tuple. */
static PyObject *
round_result(Round *rd)
{
    PyObject *misses = NULL, *hits = NULL, *stalled = NULL, *res = NULL;
    if (rd->nomem) {
        PyErr_NoMemory();
        goto done;
    }
    if (classify_collect(rd->pk, rd->n, rd->slots, rd->nslots) < 0)
        goto done;
    misses = PyList_New(0);
    if (misses == NULL)
        goto done;
    for (size_t i = 0; i < rd->n; i++) {
        Classified *p = &rd->pk[i];
        if (p->slot >= 0)
            continue;
        PyObject *b = PyBytes_FromStringAndSize(p->p ? (const char *)p->p : "",
                                                (Py_ssize_t)(p->p ? p->total : 0));
        if (b == NULL || PyList_Append(misses, b) < 0) {
            Py_XDECREF(b);
            goto done;
        }
        Py_DECREF(b);
    }
    hits = slots_list(rd->slots, rd->nslots);
    stalled = id_list(rd->stalled, rd->nstalled);
    if (hits == NULL || stalled == NULL)
        goto done;
    res = Py_BuildValue("LnOOlOi", rd->last_id, (Py_ssize_t)rd->n, misses, hits, rd->overruns,
                        stalled, rd->verdict_errno);
done:
    Py_XDECREF(misses);
    Py_XDECREF(hits);
    Py_XDECREF(stalled);
    slots_free(rd->slots, rd->nslots);
    return res;
}

/* read_queue(fd, queue_num=-1) -> (last_id, packets, misses: list[bytes], hits, overruns,
   stalled, verdict_errno): one recvmmsg; last_id is -1 when nothing was read. Hits of a
   connection with a writer are written before this returns (stalled: those whose writer
   has octets left); with queue_num the batch verdict is sent too, after the writes. */
static PyObject *
FlowCache_read_queue(FlowCache *c, PyObject *args)
{
    int fd, queue_num = -1;
    if (!PyArg_ParseTuple(args, "i|i", &fd, &queue_num))
        return NULL;
    if (c->qbuf == NULL) {
        c->qbuf = PyMem_Malloc((size_t)QUEUE_BATCH * QUEUE_BUF);
        if (c->qbuf == NULL)
            return PyErr_NoMemory();
    }
    Round *rd = PyMem_Malloc(sizeof(Round));
    if (rd == NULL)
        return PyErr_NoMemory();
    queue_round(c, fd, queue_num, c->qbuf, (uint32_t)++c->seq, MSG_DONTWAIT, rd);
    PyObject *res;
    if (rd->r < 0) {
        errno = rd->err;
        res = PyErr_SetFromErrno(PyExc_OSError);
    } else {
        res = round_result(rd);
    }
    PyMem_Free(rd);
    return res;
}

static Py_ssize_t
FlowCache_len(FlowCache *c)
{
    return (Py_ssize_t)c->count;
}

static PyObject *
FlowCache_stats(FlowCache *c, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("{s:n,s:n,s:n,s:n,s:n,s:n}", "flows", (Py_ssize_t)c->count, "hits",
                         ADD(c->hits, 0), "misses", ADD(c->misses, 0), "refused",
                         ADD(c->refused, 0), "written", ADD(c->direct, 0), "writers",
                         (Py_ssize_t)c->wcount);
}

static PyMethodDef FlowCache_methods[] = {
    {"clear", (PyCFunction)FlowCache_clear, METH_NOARGS, "Forget every flow."},
    {"install", (PyCFunction)FlowCache_install, METH_VARARGS,
     "install(packet, conn_id) -> bool: route packets like this one to conn_id."},
    {"classify", (PyCFunction)FlowCache_classify, METH_O,
     "classify(packets) -> (miss indices, [(conn_id, frames, count)])."},
    {"read_queue", (PyCFunction)FlowCache_read_queue, METH_VARARGS,
     "read_queue(fd, queue_num=-1) -> (last_id, packets, misses, hits, overruns, stalled, "
     "verdict_errno)."},
    {"set_writer", (PyCFunction)FlowCache_set_writer, METH_VARARGS,
     "set_writer(conn_id, writer): write that connection's hits in C."},
    {"drop_writer", (PyCFunction)FlowCache_drop_writer, METH_O, "drop_writer(conn_id)."},
    {"stats", (PyCFunction)FlowCache_stats, METH_NOARGS, "Counters."},
    {NULL},
};

static PySequenceMethods FlowCache_seq = {.sq_length = (lenfunc)FlowCache_len};

static PyTypeObject FlowCacheType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tcpencap.native._fastpath.FlowCache",
    .tp_basicsize = sizeof(FlowCache),
    .tp_dealloc = (destructor)FlowCache_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Outbound ESP flows Python has routed, and the queue reader that uses them.",
    .tp_methods = FlowCache_methods,
    .tp_as_sequence = &FlowCache_seq,
    .tp_init = (initproc)FlowCache_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------------------------ */
/* QueueWorker: one NFQUEUE read on a thread of its own, the GIL taken only for what     */
/* Python must see (misses, stalled writers, a failed verdict).                          */

typedef struct {
    PyObject_HEAD
    FlowCache *cache;
    int fd, queue_num;
    uint8_t *qbuf;
    int stop; /* atomic */
    int running;
    Py_ssize_t packets, reads, rounds_to_python; /* atomic */
    uint32_t seq;
} QueueWorker;

static int
QueueWorker_init(QueueWorker *q, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"cache", "fd", "queue_num", NULL};
    PyObject *cache;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!ii", kwlist, &FlowCacheType, &cache, &q->fd,
                                     &q->queue_num))
        return -1;
    Py_INCREF(cache);
    Py_XSETREF(q->cache, (FlowCache *)cache);
    return 0;
}

static void
QueueWorker_dealloc(QueueWorker *q)
{
    Py_XDECREF(q->cache);
    PyMem_RawFree(q->qbuf);
    Py_TYPE(q)->tp_free((PyObject *)q);
}

/* run(deliver): until stop(), read the queue; deliver(result) gets read_queue()'s tuple
   whenever Python has something to do. Polls with a timeout so stop() is seen. */
static PyObject *
QueueWorker_run(QueueWorker *q, PyObject *deliver)
{
    if (q->running) {
        PyErr_SetString(PyExc_RuntimeError, "this worker is running already");
        return NULL;
    }
    if (q->qbuf == NULL && (q->qbuf = PyMem_RawMalloc((size_t)QUEUE_BATCH * QUEUE_BUF)) == NULL)
        return PyErr_NoMemory();
    Round *rd = PyMem_RawMalloc(sizeof(Round));
    if (rd == NULL)
        return PyErr_NoMemory();
    q->running = 1;
    PyObject *failure = NULL;
    while (!__atomic_load_n(&q->stop, __ATOMIC_RELAXED)) {
        int ready;
        Py_BEGIN_ALLOW_THREADS
        struct pollfd pfd = {.fd = q->fd, .events = POLLIN};
        ready = poll(&pfd, 1, 200);
        if (ready > 0) {
            queue_round(q->cache, q->fd, q->queue_num, q->qbuf, ++q->seq, MSG_DONTWAIT, rd);
        }
        Py_END_ALLOW_THREADS
        if (ready <= 0)
            continue;
        if (rd->r < 0) {
            errno = rd->err;
            failure = PyErr_SetFromErrno(PyExc_OSError);
            break;
        }
        ADD(q->reads, 1);
        ADD(q->packets, (Py_ssize_t)rd->n);
        int slow = rd->nomem || rd->overruns || rd->verdict_errno || rd->nstalled;
        for (size_t i = 0; !slow && i < rd->n; i++)
            slow = rd->pk[i].slot < 0 || !rd->slots[rd->pk[i].slot].direct;
        if (!slow)
            continue; /* everything went to its writer in C */
        ADD(q->rounds_to_python, 1);
        PyObject *res = round_result(rd);
        if (res == NULL) {
            failure = NULL;
            break;
        }
        PyObject *r = PyObject_CallOneArg(deliver, res);
        Py_DECREF(res);
        if (r == NULL)
            break;
        Py_DECREF(r);
    }
    q->running = 0;
    PyMem_RawFree(rd);
    if (PyErr_Occurred() || failure != NULL)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
QueueWorker_stop(QueueWorker *q, PyObject *Py_UNUSED(ignored))
{
    __atomic_store_n(&q->stop, 1, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *
QueueWorker_stats(QueueWorker *q, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("{s:n,s:n,s:n}", "packets", ADD(q->packets, 0), "reads",
                         ADD(q->reads, 0), "to_python", ADD(q->rounds_to_python, 0));
}

static PyMethodDef QueueWorker_methods[] = {
    {"run", (PyCFunction)QueueWorker_run, METH_O,
     "run(deliver): read the queue until stop(); deliver(read_queue-style tuple)."},
    {"stop", (PyCFunction)QueueWorker_stop, METH_NOARGS, "Make run() return (within 0.2 s)."},
    {"stats", (PyCFunction)QueueWorker_stats, METH_NOARGS, "Counters."},
    {NULL},
};

static PyTypeObject QueueWorkerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tcpencap.native._fastpath.QueueWorker",
    .tp_basicsize = sizeof(QueueWorker),
    .tp_dealloc = (destructor)QueueWorker_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "QueueWorker(cache, fd, queue_num): reads one queue on its own thread.",
    .tp_methods = QueueWorker_methods,
    .tp_init = (initproc)QueueWorker_init,
    .tp_new = PyType_GenericNew,
};


/* ------------------------------------------------------------------------------------ */
/* InboundWorker: the receive side of open connections on a thread of its own. Python     */
/* lends it a connection (socket, deframer, the packet charon must see); it reads, turns  */
/* ESP frames into packets and injects them, without the GIL. At the first frame that is  */
/* not ESP (left unread in the deframer), at EOF, an error or over the frame rate, it     */
/* gives the connection back and Python's engine goes on where the worker stopped.        */

enum { R_FRAME = 1, R_EOF, R_ERROR, R_RATE, R_NOMEM };
static const char *const reason_names[] = {"", "frame", "eof", "error", "rate", "nomem"};

typedef struct {
    uint32_t conn_id;
    int fd;
    Deframer *d; /* strong reference; d->lent while here */
    uint8_t peer[16], local[16];
    int v6;
    uint32_t sport, dport;
    long max_rate; /* frames per second, 0: no limit */
    double win_start;
    Py_ssize_t win_frames;
    Py_ssize_t frames, bytes, reads; /* not yet reported to Python */
    int reason;
} Lent;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu; /* the lent table and every Lent in it */
    int ready;
    int epfd;
    int fd4, fd6;
    Lent **lent;
    size_t nlent, cap;
    Lent **back; /* given back, waiting for Python */
    size_t nback, backcap;
    InjectBatch *batch;
    int stop;
    int running;
    Py_ssize_t injected, failed, wakeups; /* atomic */
    int last_errno;
} InboundWorker;

static double
mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int
InboundWorker_init(InboundWorker *w, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd4", "fd6", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ii", kwlist, &w->fd4, &w->fd6))
        return -1;
    if (w->ready) {
        PyErr_SetString(PyExc_RuntimeError, "InboundWorker initialised twice");
        return -1;
    }
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (w->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    w->batch = (InjectBatch *)PyObject_CallNoArgs((PyObject *)&InjectBatchType);
    if (w->batch == NULL)
        return -1;
    pthread_mutex_init(&w->mu, NULL);
    w->ready = 1;
    return 0;
}

static void
lent_free(Lent *l)
{
    /* with the GIL */
    l->d->lent = 0;
    Py_DECREF(l->d);
    PyMem_RawFree(l);
}

static void
InboundWorker_dealloc(InboundWorker *w)
{
    for (size_t i = 0; i < w->nlent; i++)
        lent_free(w->lent[i]);
    for (size_t i = 0; i < w->nback; i++)
        lent_free(w->back[i]);
    PyMem_RawFree(w->lent);
    PyMem_RawFree(w->back);
    Py_XDECREF(w->batch);
    if (w->ready) {
        close(w->epfd);
        pthread_mutex_destroy(&w->mu);
    }
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static int
worker_ready(InboundWorker *w)
{
    if (!w->ready) {
        PyErr_SetString(PyExc_RuntimeError, "InboundWorker.__init__ was not called");
        return 0;
    }
    return 1;
}

/* Take the lock without holding the GIL while waiting (the worker never waits for the GIL
   while it holds the lock). */
static void
worker_lock(InboundWorker *w)
{
    if (pthread_mutex_trylock(&w->mu) == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&w->mu);
    Py_END_ALLOW_THREADS
}

static ssize_t
lent_index(InboundWorker *w, uint32_t conn_id)
{
    for (size_t i = 0; i < w->nlent; i++)
        if (w->lent[i]->conn_id == conn_id)
            return (ssize_t)i;
    return -1;
}

static void
lent_remove(InboundWorker *w, size_t i)
{
    epoll_ctl(w->epfd, EPOLL_CTL_DEL, w->lent[i]->fd, NULL);
    w->lent[i] = w->lent[--w->nlent];
}

/* attach(conn_id, fd, deframer, peer, local, sport, dport, max_rate) */
static PyObject *
InboundWorker_attach(InboundWorker *w, PyObject *args)
{
    unsigned int conn_id, sport, dport;
    int fd;
    long max_rate;
    PyObject *d, *peer_o, *local_o;
    if (!PyArg_ParseTuple(args, "IiO!OOIIl", &conn_id, &fd, &DeframerType, &d, &peer_o, &local_o,
                          &sport, &dport, &max_rate))
        return NULL;
    if (!worker_ready(w))
        return NULL;
    const uint8_t *peer, *local;
    Py_ssize_t plen, llen;
    if (addr_arg(peer_o, &peer, &plen) < 0 || addr_arg(local_o, &local, &llen) < 0)
        return NULL;
    if (plen != llen || (plen != 4 && plen != 16)) {
        PyErr_SetString(PyExc_ValueError, "peer and local must both be IPv4 or both IPv6");
        return NULL;
    }
    Deframer *df = (Deframer *)d;
    if (df->lent || df->error != NULL || df->awaiting_prefix || df->eof) {
        PyErr_SetString(PyExc_ValueError, "only an open stream past its prefix can be lent");
        return NULL;
    }
    Lent *l = PyMem_RawCalloc(1, sizeof(Lent));
    if (l == NULL)
        return PyErr_NoMemory();
    l->conn_id = conn_id;
    l->fd = fd;
    l->d = df;
    memcpy(l->peer, peer, (size_t)plen);
    memcpy(l->local, local, (size_t)llen);
    l->v6 = plen == 16;
    l->sport = sport;
    l->dport = dport;
    l->max_rate = max_rate;
    l->win_start = mono_now();
    worker_lock(w);
    PyObject *err = NULL;
    if (lent_index(w, conn_id) >= 0) {
        err = PyExc_ValueError;
    } else if (w->nlent == w->cap) {
        size_t ncap = w->cap ? w->cap * 2 : 16;
        Lent **nl = PyMem_RawRealloc(w->lent, ncap * sizeof(Lent *));
        if (nl == NULL)
            err = PyExc_MemoryError;
        else {
            w->lent = nl;
            w->cap = ncap;
        }
    }
    if (err == NULL) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = l};
        if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
            err = PyExc_OSError;
        else {
            Py_INCREF(df);
            df->lent = 1;
            w->lent[w->nlent++] = l;
        }
    }
    int saved = errno;
    pthread_mutex_unlock(&w->mu);
    if (err != NULL) {
        PyMem_RawFree(l);
        if (err == PyExc_OSError) {
            errno = saved;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        PyErr_SetString(err, err == PyExc_ValueError ? "connection already lent" : "no memory");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* detach(conn_id) -> (frames, bytes, reads) not yet reported, or None if not lent. */
static PyObject *
InboundWorker_detach(InboundWorker *w, PyObject *arg)
{
    unsigned long conn_id = PyLong_AsUnsignedLong(arg);
    if (conn_id == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (!worker_ready(w))
        return NULL;
    worker_lock(w);
    Lent *l = NULL;
    ssize_t i = lent_index(w, (uint32_t)conn_id);
    if (i >= 0) {
        l = w->lent[i];
        lent_remove(w, (size_t)i);
    } else {
        for (size_t k = 0; k < w->nback; k++) {
            if (w->back[k]->conn_id == (uint32_t)conn_id) {
                l = w->back[k];
                w->back[k] = w->back[--w->nback];
                break;
            }
        }
    }
    pthread_mutex_unlock(&w->mu);
    if (l == NULL)
        Py_RETURN_NONE;
    PyObject *res = Py_BuildValue("nnn", l->frames, l->bytes, l->reads);
    lent_free(l);
    return res;
}

/* counts(conn_id) -> (frames, bytes, reads) since the last call, or None. */
static PyObject *
InboundWorker_counts(InboundWorker *w, PyObject *arg)
{
    unsigned long conn_id = PyLong_AsUnsignedLong(arg);
    if (conn_id == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (!worker_ready(w))
        return NULL;
    worker_lock(w);
    ssize_t i = lent_index(w, (uint32_t)conn_id);
    Py_ssize_t f = 0, b = 0, r = 0;
    if (i >= 0) {
        Lent *l = w->lent[i];
        f = l->frames, b = l->bytes, r = l->reads;
        l->frames = l->bytes = l->reads = 0;
    }
    pthread_mutex_unlock(&w->mu);
    if (i < 0)
        Py_RETURN_NONE;
    return Py_BuildValue("nnn", f, b, r);
}

/* Read what the socket has and inject its ESP; a reason when the connection goes back. */
static int
lent_read(InboundWorker *w, Lent *l)
{
    Deframer *d = l->d;
    for (int round = 0; round < 8; round++) {
        if (d->pos && d->pos >= d->len)
            d->pos = d->len = 0;
        if (d->pos) {
            memmove(d->buf, d->buf + d->pos, d->len - d->pos);
            d->len -= d->pos;
            d->pos = 0;
        }
        size_t want = 65536;
        if (d->len + want > d->cap) {
            size_t ncap = d->cap ? d->cap : 4096;
            while (ncap < d->len + want)
                ncap *= 2;
            uint8_t *nb = PyMem_RawRealloc(d->buf, ncap);
            if (nb == NULL)
                return R_NOMEM;
            d->buf = nb;
            d->cap = ncap;
        }
        ssize_t r = recv(l->fd, d->buf + d->len, d->cap - d->len, MSG_DONTWAIT);
        if (r == 0)
            return R_EOF;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return R_ERROR;
        }
        d->len += (size_t)r;
        l->bytes += r;
        l->reads++;
        for (;;) {
            size_t pos = d->pos, start = 0, n = 0;
            Py_ssize_t fin = d->frames_in;
            char reason[128];
            enum kind k = deframer_frame(d, &start, &n, reason, sizeof reason);
            if (k == K_ESP) {
                if (batch_add(w->batch, l->peer, l->local, l->v6, l->sport, l->dport,
                              d->buf + start, n) < 0)
                    return R_NOMEM;
                l->frames++;
                l->win_frames++;
                if (l->max_rate) {
                    double now = mono_now();
                    if (now - l->win_start >= 1.0) {
                        l->win_start = now;
                        l->win_frames = 0;
                    } else if (l->win_frames > l->max_rate) {
                        return R_RATE;
                    }
                }
                continue;
            }
            d->pos = pos; /* the frame stays for Python's engine */
            d->frames_in = fin;
            if (k == K_NEED)
                break;
            return R_FRAME;
        }
        if ((size_t)r < want)
            break; /* the socket is empty for now */
    }
    if (d->pos >= d->len) { /* idle: no receive memory */
        PyMem_RawFree(d->buf);
        d->buf = NULL;
        d->pos = d->len = d->cap = 0;
    }
    return 0;
}

static PyObject *
back_list(InboundWorker *w)
{
    /* with the GIL and the lock */
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    for (size_t i = 0; i < w->nback; i++) {
        Lent *l = w->back[i];
        PyObject *t = Py_BuildValue("Isnnn", l->conn_id, reason_names[l->reason], l->frames,
                                    l->bytes, l->reads);
        if (t == NULL || PyList_Append(list, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(t);
        lent_free(l);
    }
    w->nback = 0;
    return list;
}

/* run(deliver): until stop(); deliver([(conn_id, reason, frames, bytes, reads), ...]) for
   connections given back. */
static PyObject *
InboundWorker_run(InboundWorker *w, PyObject *deliver)
{
    if (!worker_ready(w))
        return NULL;
    if (w->running) {
        PyErr_SetString(PyExc_RuntimeError, "this worker is running already");
        return NULL;
    }
    w->running = 1;
    struct epoll_event evs[64];
    while (!__atomic_load_n(&w->stop, __ATOMIC_RELAXED)) {
        int nback;
        Py_BEGIN_ALLOW_THREADS
        int n = epoll_wait(w->epfd, evs, 64, 200);
        pthread_mutex_lock(&w->mu);
        if (n > 0)
            ADD(w->wakeups, 1);
        for (int i = 0; i < n; i++) {
            Lent *l = evs[i].data.ptr;
            /* a connection detached while we waited is no longer in the table */
            ssize_t at = -1;
            for (size_t k = 0; k < w->nlent; k++)
                if (w->lent[k] == l)
                    at = (ssize_t)k;
            if (at < 0)
                continue;
            int why = lent_read(w, l);
            if (why) {
                l->reason = why;
                lent_remove(w, (size_t)at);
                if (w->nback == w->backcap) {
                    size_t ncap = w->backcap ? w->backcap * 2 : 16;
                    Lent **nb = PyMem_RawRealloc(w->back, ncap * sizeof(Lent *));
                    if (nb != NULL) {
                        w->back = nb;
                        w->backcap = ncap;
                    }
                }
                if (w->nback < w->backcap)
                    w->back[w->nback++] = l;
            }
        }
        if (w->batch->n) {
            Py_ssize_t sent, failed;
            batch_send(w->batch, w->fd4, w->fd6, &sent, &failed);
            ADD(w->injected, sent);
            ADD(w->failed, failed);
            if (failed)
                w->last_errno = w->batch->last_errno;
        }
        nback = (int)w->nback;
        pthread_mutex_unlock(&w->mu);
        Py_END_ALLOW_THREADS
        if (!nback)
            continue;
        worker_lock(w);
        PyObject *list = back_list(w);
        pthread_mutex_unlock(&w->mu);
        if (list == NULL)
            break;
        PyObject *r = PyObject_CallOneArg(deliver, list);
        Py_DECREF(list);
        if (r == NULL)
            break;
        Py_DECREF(r);
    }
    w->running = 0;
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
InboundWorker_stop(InboundWorker *w, PyObject *Py_UNUSED(ignored))
{
    __atomic_store_n(&w->stop, 1, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *
InboundWorker_stats(InboundWorker *w, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("{s:n,s:n,s:n,s:n,s:i}", "lent", (Py_ssize_t)w->nlent, "injected",
                         ADD(w->injected, 0), "inject_failed", ADD(w->failed, 0), "wakeups",
                         ADD(w->wakeups, 0), "last_errno", w->last_errno);
}

static PyMethodDef InboundWorker_methods[] = {
    {"attach", (PyCFunction)InboundWorker_attach, METH_VARARGS,
     "attach(conn_id, fd, deframer, peer, local, sport, dport, max_rate): lend a connection."},
    {"detach", (PyCFunction)InboundWorker_detach, METH_O,
     "detach(conn_id) -> (frames, bytes, reads) or None: take a connection back."},
    {"counts", (PyCFunction)InboundWorker_counts, METH_O,
     "counts(conn_id) -> (frames, bytes, reads) since the last call, or None."},
    {"run", (PyCFunction)InboundWorker_run, METH_O, "run(deliver): serve until stop()."},
    {"stop", (PyCFunction)InboundWorker_stop, METH_NOARGS, "Make run() return (within 0.2 s)."},
    {"stats", (PyCFunction)InboundWorker_stats, METH_NOARGS, "Counters."},
    {NULL},
};

static PyTypeObject InboundWorkerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tcpencap.native._fastpath.InboundWorker",
    .tp_basicsize = sizeof(InboundWorker),
    .tp_dealloc = (destructor)InboundWorker_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "InboundWorker(fd4, fd6): reads lent connections and injects their ESP.",
    .tp_methods = InboundWorker_methods,
    .tp_init = (initproc)InboundWorker_init,
    .tp_new = PyType_GenericNew,
};
/* ------------------------------------------------------------------------------------ */

static PyMethodDef module_methods[] = {
    {"bind_events", bind_events, METH_VARARGS,
     "bind_events(NeedData(), Keepalive(), PrefixReceived(), ConnectionClosed(), IKEMessage, "
     "ESPPacket, InvalidFrame, ProtocolError, Role.RESPONDER)"},
    {NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastpath",
    .m_doc = "The native RFC 9329 data path.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    if (PyType_Ready(&InjectBatchType) < 0 || PyType_Ready(&DeframerType) < 0 ||
        PyType_Ready(&TcpWriterType) < 0 || PyType_Ready(&FlowCacheType) < 0 ||
        PyType_Ready(&QueueWorkerType) < 0 || PyType_Ready(&InboundWorkerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "InjectBatch", (PyObject *)&InjectBatchType) < 0 ||
        PyModule_AddObjectRef(m, "Deframer", (PyObject *)&DeframerType) < 0 ||
        PyModule_AddObjectRef(m, "FlowCache", (PyObject *)&FlowCacheType) < 0 ||
        PyModule_AddObjectRef(m, "TcpWriter", (PyObject *)&TcpWriterType) < 0 ||
        PyModule_AddObjectRef(m, "QueueWorker", (PyObject *)&QueueWorkerType) < 0 ||
        PyModule_AddObjectRef(m, "InboundWorker", (PyObject *)&InboundWorkerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
