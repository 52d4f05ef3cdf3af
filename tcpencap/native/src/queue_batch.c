/* NFQUEUE batches (queue_batch.h): one recvmmsg of queued packets, classified against the
   flow cache, and the batch verdict. */
#include "queue_batch.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <linux/netlink.h>

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

int
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
void
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

PyObject *
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
PyObject *
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

