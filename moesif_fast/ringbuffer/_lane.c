/* moesif_fast.ringbuffer._lane: a producer's append to its lane, in C.

`append(ring, control, base, capacity, max_record, max_records, record)` does what
`Producer._append` does in Python for a ring that publishes with plain stores (not in
locked-publish mode), with the same result and the same bytes in the ring: it writes `record`
and its header (and a pad record where the lane wraps) in the lane whose control words start at
word `control` and whose data starts at byte `base` of `ring` (the mapping, writable), then
publishes the new tail with one release store, and counts the append; or it counts a drop and
writes nothing (record over `max_record`, lane full in bytes or in `max_records`, or a lane in a
state no producer leaves it in). True when published.

The lane's words are shared with other processes and trusted for nothing: every position read
is checked before it is used, so a damaged or hostile lane makes a counted drop, never a write
outside the lane. The arguments are the producer's own (from the ring's validated geometry);
they are still checked against the mapping's size. See layout.py for the format. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* layout.py: control words of a lane, record header, kinds, limits */
enum { TAIL = 0, APPENDED = 2, DROPPED_FULL = 3, DROPPED_OVERSIZE = 4, HEAD = 16,
       CONSUMED = 17, CONTROL_WORDS = 19 };
#define RECORD_HEADER_BYTES 16
#define KIND_RECORD 1
#define KIND_PAD 2
#define POSITION_LIMIT ((uint64_t)1 << 62)

static void put_le(unsigned char *out, uint64_t value, int size)
{
    for (int index = 0; index < size; index++)
        out[index] = (unsigned char)(value >> (8 * index));
}

/* The record header: payload size (u32), kind (u16), 0 (u16), the record's position (u64). */
static void put_header(unsigned char *out, uint64_t size, int kind, uint64_t position)
{
    put_le(out, size, 4);
    put_le(out + 4, (uint64_t)kind, 2);
    put_le(out + 6, 0, 2);
    put_le(out + 8, position, 8);
}

static int argument(PyObject *value, Py_ssize_t *result)
{
    *result = PyLong_AsSsize_t(value);
    return *result == -1 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *append(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "append() takes 7 arguments");
        return NULL;
    }
    Py_ssize_t control, base, capacity, max_record, max_records;
    if (argument(args[1], &control) < 0 || argument(args[2], &base) < 0
        || argument(args[3], &capacity) < 0 || argument(args[4], &max_record) < 0
        || argument(args[5], &max_records) < 0)
        return NULL;
    Py_buffer ring, record;
    if (PyObject_GetBuffer(args[0], &ring, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[6], &record, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&ring);
        return NULL;
    }
    PyObject *result = NULL;
    if (control < 0 || control > ring.len / 8 - CONTROL_WORDS || base < 0 || capacity < 64
        || (capacity & (capacity - 1)) || base % 16 || base > ring.len - capacity
        || max_record < 0 || max_records < 0 || ((uintptr_t)ring.buf & 7)) {
        PyErr_SetString(PyExc_ValueError, "append(): a lane outside the ring");
        goto done;
    }
    uint64_t *words = (uint64_t *)ring.buf + control;
    unsigned char *lane = (unsigned char *)ring.buf + base;
    uint64_t size = (uint64_t)record.len;
    if (size > (uint64_t)max_record) {
        words[DROPPED_OVERSIZE] += 1;
        result = Py_NewRef(Py_False);
        goto done;
    }
    uint64_t lane_bytes = (uint64_t)capacity;
    uint64_t tail = __atomic_load_n(&words[TAIL], __ATOMIC_RELAXED); /* this producer's own */
    uint64_t head = __atomic_load_n(&words[HEAD], __ATOMIC_ACQUIRE); /* the reader's */
    uint64_t appended = words[APPENDED];
    uint64_t consumed = __atomic_load_n(&words[CONSUMED], __ATOMIC_ACQUIRE);
    uint64_t offset = tail & (lane_bytes - 1);
    uint64_t span = (size + RECORD_HEADER_BYTES + 15) & ~(uint64_t)15;
    uint64_t pad = span > lane_bytes - offset ? lane_bytes - offset : 0;
    /* a damaged lane (layout.lane_is_sane), or full: refused until the reader repairs it */
    if (tail < head || (tail | head) & 15 || tail >= POSITION_LIMIT
        || tail + pad + span - head > lane_bytes
        || (appended >= consumed && appended - consumed >= (uint64_t)max_records)) {
        words[DROPPED_FULL] += 1;
        result = Py_NewRef(Py_False);
        goto done;
    }
    if (pad) {
        put_header(lane + offset, pad - RECORD_HEADER_BYTES, KIND_PAD, tail);
        offset = 0;
    }
    memcpy(lane + offset + RECORD_HEADER_BYTES, record.buf, (size_t)size);
    put_header(lane + offset, size, KIND_RECORD, tail + pad);
    __atomic_store_n(&words[TAIL], tail + pad + span, __ATOMIC_RELEASE); /* the publish */
    words[APPENDED] = appended + 1;
    result = Py_NewRef(Py_True);
done:
    PyBuffer_Release(&record);
    PyBuffer_Release(&ring);
    return result;
}

static PyMethodDef methods[] = {
    {"append", (PyCFunction)(void (*)(void))append, METH_FASTCALL,
     "append(ring, control, base, capacity, max_record, max_records, record) -> bool: "
     "Producer._append in C (see producer.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "moesif_fast.ringbuffer._lane",
    .m_doc = "A producer's append to its lane, in C (see producer.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__lane(void)
{
    return PyModule_Create(&module);
}
