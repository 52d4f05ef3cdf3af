/* Deframer (deframer.h): StreamCodec's events, and pump(). */
#include "deframer.h"

#include <stdio.h>
#include <string.h>

#include "inject.h"

/* ------------------------------------------------------------------------------------ */
/* Event objects of tcpencap.wire.rfc9329, handed over by bind_events().                 */

static PyObject *ev_need_data, *ev_keepalive, *ev_prefix_received, *ev_closed;
static PyObject *cls_ike, *cls_esp, *cls_invalid, *cls_protocol_error, *role_responder;

PyObject *
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
/* Deframer                                                                               */

static int
deframer_usable(Deframer *d)
{
    if (d->lent) {
        PyErr_SetString(PyExc_RuntimeError, "the deframer is lent to the inbound worker");
        return 0;
    }
    return 1;
}

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

/* Room for n more octets after what is unread (consumed octets are dropped first). No
   Python objects: the inbound worker calls it without the GIL. -> 0, or -1 out of memory. */
int
deframer_reserve(Deframer *d, size_t n)
{
    if (d->pos) {
        if (d->pos >= d->len) {
            d->len = 0;
        } else {
            memmove(d->buf, d->buf + d->pos, d->len - d->pos);
            d->len -= d->pos;
        }
        d->pos = 0;
    }
    size_t need = d->len + n;
    if (need > d->cap) {
        size_t ncap = d->cap ? d->cap : 4096;
        while (ncap < need)
            ncap *= 2;
        uint8_t *nb = PyMem_RawRealloc(d->buf, ncap);
        if (nb == NULL)
            return -1;
        d->buf = nb;
        d->cap = ncap;
    }
    return 0;
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
    if (deframer_reserve(d, (size_t)view.len) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(d->buf + d->len, view.buf, (size_t)view.len);
    d->len += (size_t)view.len;
    res = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&view);
    return res;
}

/* After NeedData nothing but a partial frame is left; when nothing is, the buffer goes, so
   an idle connection holds no receive memory (the next read allocates again). */
void
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

enum kind
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

/* pump(batch, peer, local, sport, dport) -> (event, esp_frames): every ESP frame up to the
   next other event becomes a packet in batch, every keepalive is dropped here (counted in
   keepalives: a flood of them costs no Python per frame); that event is returned as
   next_event() would. */
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
    int v6;
    if (addr_pair(peer_o, local_o, &peer, &local, &v6) < 0)
        return NULL;
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
            if (k == K_ESP && n <= (v6 ? MAX_UDP_PAYLOAD_V6 : MAX_UDP_PAYLOAD_V4)) {
                if (batch_add((InjectBatch *)batch, peer, local, v6, sport, dport,
                              d->buf + start, n) < 0)
                    return PyErr_NoMemory();
                esp++;
                continue;
            }
            if (k == K_KEEPALIVE) {
                d->keepalives++;
                continue;
            }
            /* anything else, and ESP no datagram can carry, is the engine's to judge */
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
Deframer_get_keepalives(Deframer *d, void *c)
{
    return PyLong_FromSsize_t(d->keepalives);
}

static int
Deframer_set_keepalives(Deframer *d, PyObject *v, void *c)
{
    Py_ssize_t n = v == NULL ? -1 : PyLong_AsSsize_t(v);
    if (n < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "keepalives must be an int >= 0");
        return -1;
    }
    d->keepalives = n;
    return 0;
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
    {0},
};

static PyGetSetDef Deframer_getset[] = {
    {"prefix_received", (getter)Deframer_get_prefix_received, NULL, NULL, NULL},
    {"frames_in", (getter)Deframer_get_frames_in, NULL, NULL, NULL},
    {"keepalives", (getter)Deframer_get_keepalives, (setter)Deframer_set_keepalives,
     "keepalives pump() dropped (the engine takes them and sets 0)", NULL},
    {"bytes_buffered", (getter)Deframer_get_bytes_buffered, NULL, NULL, NULL},
    {"role", (getter)Deframer_get_role, NULL, NULL, NULL},
    {"max_frame", (getter)Deframer_get_max_frame, NULL, NULL, NULL},
    {"allocated", (getter)Deframer_get_allocated, NULL, "octets of receive buffer held", NULL},
    {0},
};

PyTypeObject DeframerType = {
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

