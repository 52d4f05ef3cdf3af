/* Deframer: the receive side of an RFC 9329 stream with the events of
   tcpencap.wire.rfc9329.StreamCodec (the reference), and pump(), which turns an open
   connection's ESP frames straight into the packets the router would have built. The
   inbound worker reads into a lent deframer with the frame functions below. */
#ifndef TCPENCAP_NATIVE_DEFRAMER_H
#define TCPENCAP_NATIVE_DEFRAMER_H

#include "common.h"

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
    Py_ssize_t keepalives; /* dropped by pump() itself since the engine last took them */
    uint8_t *buf;
    size_t len, cap, pos;
    PyObject *error; /* the ProtocolError every later event repeats */
    int lent;        /* the inbound worker reads into it: Python must not touch it */
} Deframer;

/* What the next frame is; K_NEED: not all of it is here yet. */
enum kind { K_NEED, K_CLOSED, K_ERROR, K_IKE, K_ESP, K_KEEPALIVE, K_INVALID };

extern PyTypeObject DeframerType;

/* bind_events(NeedData(), Keepalive(), PrefixReceived(), ConnectionClosed(), IKEMessage,
   ESPPacket, InvalidFrame, ProtocolError, Role.RESPONDER): the module function that hands
   the deframer tcpencap.wire.rfc9329's events. */
PyObject *bind_events(PyObject *mod, PyObject *args);

/* Room for n more octets after what is unread. Without the GIL. -> 0, or -1 out of
   memory. */
int deframer_reserve(Deframer *d, size_t n);

/* The next frame after the prefix: its kind, and where its payload is (start, n octets);
   *reason gets the text of K_ERROR and K_INVALID. Consumes the frame unless K_NEED,
   K_CLOSED or K_ERROR. Without the GIL. */
enum kind deframer_frame(Deframer *d, size_t *start, size_t *n, char *reason, size_t rlen);

/* When nothing unread is left, the buffer goes: an idle connection holds no receive
   memory. Without the GIL. */
void deframer_settle(Deframer *d);

#endif
