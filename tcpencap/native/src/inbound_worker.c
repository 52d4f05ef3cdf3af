/* InboundWorker (inbound_worker.h): lent connections read and their ESP injected. */
#include "inbound_worker.h"

#include <errno.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static const char *const reason_names[] = {"", "frame", "eof", "error", "rate", "nomem"};

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

/* attach(conn_id, fd, deframer, peer, local, sport, dport, max_rate, now=None): now, the
   engine's time at the lending (frame_rate.h: the same clock), begins the rate window;
   None: the worker reads the clock. */
static PyObject *
InboundWorker_attach(InboundWorker *w, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"conn_id", "fd", "deframer", "peer", "local", "sport", "dport",
                             "max_rate", "now", NULL};
    unsigned int conn_id, sport, dport;
    int fd;
    long max_rate;
    PyObject *d, *peer_o, *local_o, *now_o = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "IiO!OOIIl|O", kwlist, &conn_id, &fd,
                                     &DeframerType, &d, &peer_o, &local_o, &sport, &dport,
                                     &max_rate, &now_o))
        return NULL;
    if (!worker_ready(w))
        return NULL;
    double start = now_o == Py_None ? mono_now() : PyFloat_AsDouble(now_o);
    if (start == -1.0 && PyErr_Occurred())
        return NULL;
    const uint8_t *peer, *local;
    int v6;
    if (addr_pair(peer_o, local_o, &peer, &local, &v6) < 0)
        return NULL;
    size_t alen = v6 ? 16 : 4;
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
    memcpy(l->peer, peer, alen);
    memcpy(l->local, local, alen);
    l->v6 = v6;
    l->sport = sport;
    l->dport = dport;
    l->max_rate = max_rate;
    l->rate.start = start;
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

/* A conn_id argument of a ready worker. -> 0, or -1 with an exception. */
static int
conn_id_arg(InboundWorker *w, PyObject *arg, uint32_t *conn_id)
{
    unsigned long v = PyLong_AsUnsignedLong(arg);
    if (v == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    if (!worker_ready(w))
        return -1;
    *conn_id = (uint32_t)v;
    return 0;
}

/* detach(conn_id) -> (frames, bytes, reads, keepalives) not yet reported, or None if not
   lent. */
static PyObject *
InboundWorker_detach(InboundWorker *w, PyObject *arg)
{
    uint32_t conn_id;
    if (conn_id_arg(w, arg, &conn_id) < 0)
        return NULL;
    worker_lock(w);
    Lent *l = NULL;
    ssize_t i = lent_index(w, conn_id);
    if (i >= 0) {
        l = w->lent[i];
        lent_remove(w, (size_t)i);
    } else {
        for (size_t k = 0; k < w->nback; k++) {
            if (w->back[k]->conn_id == conn_id) {
                l = w->back[k];
                w->back[k] = w->back[--w->nback];
                break;
            }
        }
    }
    pthread_mutex_unlock(&w->mu);
    if (l == NULL)
        Py_RETURN_NONE;
    PyObject *res = Py_BuildValue("nnnn", l->frames, l->bytes, l->reads, l->keepalives);
    lent_free(l);
    return res;
}

/* counts(conn_id) -> (frames, bytes, reads, keepalives) since the last call, or None. */
static PyObject *
InboundWorker_counts(InboundWorker *w, PyObject *arg)
{
    uint32_t conn_id;
    if (conn_id_arg(w, arg, &conn_id) < 0)
        return NULL;
    worker_lock(w);
    ssize_t i = lent_index(w, conn_id);
    Py_ssize_t f = 0, b = 0, r = 0, k = 0;
    if (i >= 0) {
        Lent *l = w->lent[i];
        f = l->frames, b = l->bytes, r = l->reads, k = l->keepalives;
        l->frames = l->bytes = l->reads = l->keepalives = 0;
    }
    pthread_mutex_unlock(&w->mu);
    if (i < 0)
        Py_RETURN_NONE;
    return Py_BuildValue("nnnn", f, b, r, k);
}

/* Read what the socket has and inject its ESP; a reason when the connection goes back. */
int
lent_read(InboundWorker *w, Lent *l, double now)
{
    Deframer *d = l->d;
    for (int round = 0; round < 8; round++) {
        size_t want = 65536;
        if (deframer_reserve(d, want) < 0)
            return R_NOMEM;
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
            if (k == K_ESP && n <= (l->v6 ? MAX_UDP_PAYLOAD_V6 : MAX_UDP_PAYLOAD_V4)) {
                if (batch_add(w->batch, l->peer, l->local, l->v6, l->sport, l->dport,
                              d->buf + start, n) < 0)
                    return R_NOMEM;
                l->frames++; /* ESP is what the tunnel is for: not held to the frame rate */
                continue;
            }
            if (k == K_KEEPALIVE) { /* RFC 9329 §6.6: dropped, but it costs like any frame */
                l->keepalives++;
                if (rate_window_over(&l->rate, now, l->max_rate))
                    return R_RATE;
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
    deframer_settle(d); /* idle: no receive memory */
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
        PyObject *t = Py_BuildValue("Isnnnn", l->conn_id, reason_names[l->reason], l->frames,
                                    l->bytes, l->reads, l->keepalives);
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

/* run(deliver): until stop(); deliver([(conn_id, reason, frames, bytes, reads, keepalives),
   ...]) for connections given back. */
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
        double now = mono_now(); /* one time per wake-up, as the engine has one per drain */
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
            int why = lent_read(w, l, now);
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
    {"attach", (PyCFunction)(void (*)(void))InboundWorker_attach, METH_VARARGS | METH_KEYWORDS,
     "attach(conn_id, fd, deframer, peer, local, sport, dport, max_rate, now=None): lend a "
     "connection; now (time.monotonic()'s clock) begins its frame-rate window."},
    {"detach", (PyCFunction)InboundWorker_detach, METH_O,
     "detach(conn_id) -> (frames, bytes, reads, keepalives) or None: take a connection back."},
    {"counts", (PyCFunction)InboundWorker_counts, METH_O,
     "counts(conn_id) -> (frames, bytes, reads, keepalives) since the last call, or None."},
    {"run", (PyCFunction)InboundWorker_run, METH_O, "run(deliver): serve until stop()."},
    {"stop", (PyCFunction)InboundWorker_stop, METH_NOARGS, "Make run() return (within 0.2 s)."},
    {"stats", (PyCFunction)InboundWorker_stats, METH_NOARGS, "Counters."},
    {0},
};

PyTypeObject InboundWorkerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tcpencap.native._fastpath.InboundWorker",
    .tp_basicsize = sizeof(InboundWorker),
    .tp_dealloc = (destructor)InboundWorker_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "InboundWorker(fd4, fd6): reads lent connections and injects their ESP.",
    .tp_methods = InboundWorker_methods,
    .tp_init = (initproc)InboundWorker_init,
    .tp_new = PyType_GenericNew,
};
