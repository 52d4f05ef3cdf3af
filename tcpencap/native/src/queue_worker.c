/* QueueWorker (queue_worker.h): NFQUEUE rounds on a thread of its own. */
#include "queue_worker.h"

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>

#include "flow_cache.h"
#include "queue_batch.h"

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
    {0},
};

PyTypeObject QueueWorkerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tcpencap.native._fastpath.QueueWorker",
    .tp_basicsize = sizeof(QueueWorker),
    .tp_dealloc = (destructor)QueueWorker_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "QueueWorker(cache, fd, queue_num): reads one queue on its own thread.",
    .tp_methods = QueueWorker_methods,
    .tp_init = (initproc)QueueWorker_init,
    .tp_new = PyType_GenericNew,
};


