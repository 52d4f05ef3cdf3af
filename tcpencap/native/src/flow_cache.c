/* FlowCache (flow_cache.h): the flow table, the writer table, and classify. */
#include "flow_cache.h"

#include <stdlib.h>
#include <string.h>

#include "queue_batch.h"

#define FLOW_MAX (1u << 17)
#define WRITER_MAX (1u << 20)

/* The conditions of Router.outbound's fast path, octet for octet: ESP-in-UDP from port
   4500, IPv4 without options or fragments or IPv6 without extension headers. */
int
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

TcpWriter *
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

int
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

int
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

PyObject *
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

void
slots_free(Slot *slots, size_t nslots)
{
    for (size_t s = 0; s < nslots; s++)
        Py_CLEAR(slots[s].data);
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
    {0},
};

static PySequenceMethods FlowCache_seq = {.sq_length = (lenfunc)FlowCache_len};

PyTypeObject FlowCacheType = {
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

