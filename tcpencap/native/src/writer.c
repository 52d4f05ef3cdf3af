/* TcpWriter (writer.h): one connection's send buffer and its bound. */
#include "writer.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int
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
int
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
        if (queued > w->ike_limit) {
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

/* Send as much of src as the socket takes now; a hard error is kept in w->error.
   -> the octets sent. */
static size_t
writer_send(TcpWriter *w, const uint8_t *src, size_t n)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = send(w->fd, src + done, n - done, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r > 0) {
            done += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (!(r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)))
            w->error = r < 0 ? errno : EPIPE;
        break;
    }
    return done;
}

void
writer_flush(TcpWriter *w)
{
    if (w->fd < 0 || w->collect || w->error)
        return;
    if (w->len > w->pos) /* an idle writer has no buffer: no offset from NULL */
        w->pos += writer_send(w, w->buf + w->pos, w->len - w->pos);
    if (w->pos == w->len || w->error)
        writer_forget(w); /* all sent (or broken): an idle connection keeps no send memory */
}

/* Queue data (sent first straight from the caller's octets when nothing waits). */
static int
writer_put(TcpWriter *w, const uint8_t *src, size_t n)
{
    if (w->pos == w->len && w->fd >= 0 && !w->collect) {
        size_t sent = writer_send(w, src, n);
        if (w->error)
            return 0;
        src += sent;
        n -= sent;
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
    static char *kwlist[] = {"fd", "limit", "ike_factor", NULL};
    int fd;
    Py_ssize_t limit, ike_factor = IKE_FACTOR_DEFAULT;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "in|n", kwlist, &fd, &limit, &ike_factor))
        return -1;
    if (limit < 0) {
        PyErr_SetString(PyExc_ValueError, "limit must not be negative");
        return -1;
    }
    if (ike_factor < 1) {
        PyErr_SetString(PyExc_ValueError, "ike_factor must be at least 1");
        return -1;
    }
    if (!w->ready) {
        pthread_mutex_init(&w->mu, NULL);
        w->ready = 1;
    }
    w->fd = fd;
    w->collect = fd < 0;
    w->limit = (size_t)limit;
    size_t factor = (size_t)ike_factor;
    w->ike_limit = w->limit > SIZE_MAX / factor ? SIZE_MAX : w->limit * factor;
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
    PyObject *b = w->buf == NULL ? PyBytes_FromStringAndSize("", 0)
                                 : PyBytes_FromStringAndSize((char *)w->buf + w->pos,
                                                             (Py_ssize_t)(w->len - w->pos));
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
    {0},
};

static PyGetSetDef TcpWriter_getset[] = {
    {"pending", (getter)TcpWriter_get_pending, NULL, "octets queued, not yet sent", NULL},
    {"fd", (getter)TcpWriter_get_fd, NULL, NULL, NULL},
    {"error", (getter)TcpWriter_get_error, NULL, "errno of the send that broke it", NULL},
    {"direct_frames", (getter)TcpWriter_get_direct_frames, NULL, NULL, NULL},
    {"direct_bytes", (getter)TcpWriter_get_direct_bytes, NULL, NULL, NULL},
    {"esp_dropped", (getter)TcpWriter_get_esp_dropped, NULL, NULL, NULL},
    {"ike_dropped", (getter)TcpWriter_get_ike_dropped, NULL, NULL, NULL},
    {0},
};

PyTypeObject TcpWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tcpencap.native._fastpath.TcpWriter",
    .tp_basicsize = sizeof(TcpWriter),
    .tp_dealloc = (destructor)TcpWriter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "TcpWriter(fd, limit, ike_factor=4): one connection's send buffer, shared with "
              "the flow cache; ESP is dropped over limit queued octets, IKE over limit * "
              "ike_factor.",
    .tp_methods = TcpWriter_methods,
    .tp_getset = TcpWriter_getset,
    .tp_init = (initproc)TcpWriter_init,
    .tp_new = PyType_GenericNew,
};

