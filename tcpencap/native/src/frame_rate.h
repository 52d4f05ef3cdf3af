/* max_frame_rate on the inbound worker's thread, and the clock it reads.

   The rule is the engine's (core/rfc9329_engine.py, _frame_budget): a gateway connection
   may send max_rate frames that carry no tunnel ESP in a one-second window; a window ends
   one second after it began, and the next begins at the first frame after that. The
   worker applies it to the frames it consumes itself (keepalives) while Python does not
   run; the time is an argument, as in the engine, read once per wake-up as the engine
   takes one `now` per drain. One difference is kept as it was: the frame that begins a
   window is not counted in it here, where the engine counts it (max_rate + 1 frames in
   such a window, against the engine's max_rate).

   Why the worker's times and the engine's agree: the engine's `now` is time.monotonic()
   (the RFC 9329 shell) or loop.time() (asyncio's BaseEventLoop.time() returns
   time.monotonic()), and on Linux time.monotonic() is clock_gettime(CLOCK_MONOTONIC)
   (time.get_clock_info("monotonic") says so). mono_now() reads that same clock, in the
   same unit (seconds, a double), so a time the engine passes in (attach()'s `now`) and
   the times the worker reads are points on one line: they can be compared and
   subtracted. A caller with another clock (a test's fake one) must not pass its `now` to
   the worker: it would mix two lines. */
#ifndef TCPENCAP_NATIVE_FRAME_RATE_H
#define TCPENCAP_NATIVE_FRAME_RATE_H

#include <time.h>

#include "common.h"

typedef struct {
    double start;      /* when the window began, on CLOCK_MONOTONIC */
    Py_ssize_t frames; /* frames counted in it */
} RateWindow;

/* The engine's clock (see above), in seconds. */
static inline double
mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One more frame at now: 1 when it goes over max_rate (0: no limit). */
static inline int
rate_window_over(RateWindow *w, double now, long max_rate)
{
    w->frames++;
    if (!max_rate)
        return 0;
    if (now - w->start >= 1.0) {
        w->start = now;
        w->frames = 0;
        return 0;
    }
    return w->frames > max_rate;
}

#endif
