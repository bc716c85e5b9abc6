/* The C interface of moesif_fast.ringbuffer._lane for other extensions: a capsule, the module's
   `API` attribute, holding a LaneAPI (the CPython way for one extension to call another:
   PyCapsule_Import(LANE_API_CAPSULE, 0)).

   `write(appender, data, size)` appends the `size` bytes at `data` as one record through an
   object of exactly type `appender_type` (an `_lane.Appender`), without a bytes object: 1 when
   published, 0 when dropped (counted in the lane), -1 with an exception set, or LANE_NOT_OWNED
   when the appender owns no lane (nothing done: call the appender with the record instead). */

#ifndef MOESIF_FAST_LANE_H
#define MOESIF_FAST_LANE_H

#include <Python.h>

#define LANE_API_CAPSULE "moesif_fast.ringbuffer._lane.API"
#define LANE_NOT_OWNED 2

typedef struct {
    PyTypeObject *appender_type;
    int (*write)(PyObject *appender, const char *data, Py_ssize_t size);
} LaneAPI;

#endif
