/* moesif_fast.ringbuffer._lane: a producer's append to its lane, and the reader's loop over a
lane's records, in C.

`append(ring, control, base, capacity, max_record, max_records, record)` does what
`Producer._append` does in Python for a ring that publishes with plain stores (not in
locked-publish mode), with the same result and the same bytes in the ring: it writes `record`
and its header (and a pad record where the lane wraps) in the lane whose control words start at
word `control` and whose data starts at byte `base` of `ring` (the mapping, writable), then
publishes the new tail with one release store, and counts the append; or it counts a drop and
writes nothing (record over `max_record`, lane full in bytes or in `max_records`, or a lane in a
state no producer leaves it in). True when published.

`Appender(otherwise)` is a producer's `append` while it may own a lane: `own(...)` gives it the
lane (append's first six arguments), `release()` takes it back. Called with a record, it
appends it to the owned lane as `append` does, or, owning none, answers `otherwise(record)`.
Other extensions append through it without a bytes object via the capsule `API` (_lane.h).

The lane's words are shared with other processes and trusted for nothing: every position read
is checked before it is used, so a damaged or hostile lane makes a counted drop, never a write
outside the lane. The arguments are the producer's own (from the ring's validated geometry);
they are still checked against the mapping's size. See layout.py for the format.

`scan(...)` is the reader's side: the loop of `Reader._read_lane` over a lane's records (see
its comment below); `Marker(...)`, the reader's `mark` of the record it decodes. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "_lane.h"

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

/* Where a lane is: its first control word and first data byte in the ring, its size, and the
   ring's limits on one record and on a lane's unconsumed records. */
typedef struct {
    Py_ssize_t control, base, capacity, max_record, max_records;
} Lane;

/* Whether the lane lies inside the `ring_size` bytes at `ring`; ValueError set when not. */
static int lane_inside(const Lane *where, const void *ring, Py_ssize_t ring_size)
{
    Py_ssize_t control = where->control, base = where->base, capacity = where->capacity;
    if (control < 0 || control > ring_size / 8 - CONTROL_WORDS || base < 0 || capacity < 64
        || (capacity & (capacity - 1)) || base % 16 || base > ring_size - capacity
        || where->max_record < 0 || where->max_records < 0 || ((uintptr_t)ring & 7)) {
        PyErr_SetString(PyExc_ValueError, "append(): a lane outside the ring");
        return 0;
    }
    return 1;
}

/* Write `size` bytes at `data` as one record in the lane, and publish it: 1 when published, 0
   when dropped (counted in the lane), -1 (ValueError) when the lane is not inside `ring`. */
static int lane_append(const Lane *where, void *ring, Py_ssize_t ring_size, const void *data,
                       Py_ssize_t record_size)
{
    if (!lane_inside(where, ring, ring_size))
        return -1;
    uint64_t *words = (uint64_t *)ring + where->control;
    unsigned char *lane = (unsigned char *)ring + where->base;
    uint64_t size = (uint64_t)record_size;
    if (size > (uint64_t)where->max_record) {
        words[DROPPED_OVERSIZE] += 1;
        return 0;
    }
    uint64_t lane_bytes = (uint64_t)where->capacity;
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
        || (appended >= consumed && appended - consumed >= (uint64_t)where->max_records)) {
        words[DROPPED_FULL] += 1;
        return 0;
    }
    if (pad) {
        put_header(lane + offset, pad - RECORD_HEADER_BYTES, KIND_PAD, tail);
        offset = 0;
    }
    memcpy(lane + offset + RECORD_HEADER_BYTES, data, (size_t)size);
    put_header(lane + offset, size, KIND_RECORD, tail + pad);
    __atomic_store_n(&words[TAIL], tail + pad + span, __ATOMIC_RELEASE); /* the publish */
    words[APPENDED] = appended + 1;
    return 1;
}

/* The lane's five numbers from Python integers at `args`. */
static int lane_of(PyObject *const *args, Lane *where)
{
    Py_ssize_t *fields[5] = {&where->control, &where->base, &where->capacity,
                             &where->max_record, &where->max_records};
    for (int index = 0; index < 5; index++) {
        *fields[index] = PyLong_AsSsize_t(args[index]);
        if (*fields[index] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* lane_append into `ring`, an object exporting the ring's writable memory. */
static int ring_append(PyObject *ring, const Lane *where, const void *data, Py_ssize_t size)
{
    Py_buffer memory;
    if (PyObject_GetBuffer(ring, &memory, PyBUF_WRITABLE) < 0)
        return -1;
    int published = lane_append(where, memory.buf, memory.len, data, size);
    PyBuffer_Release(&memory);
    return published;
}

/* ring_append of a record given as bytes (or any buffer): True, False, or NULL on error. */
static PyObject *append_buffer(PyObject *ring, const Lane *where, PyObject *record)
{
    Py_buffer data;
    if (PyObject_GetBuffer(record, &data, PyBUF_SIMPLE) < 0)
        return NULL;
    int published = ring_append(ring, where, data.buf, data.len);
    PyBuffer_Release(&data);
    return published < 0 ? NULL : PyBool_FromLong(published);
}

static PyObject *append(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "append() takes 7 arguments");
        return NULL;
    }
    Lane where;
    return lane_of(args + 1, &where) < 0 ? NULL : append_buffer(args[0], &where, args[6]);
}

/* -- Appender: a producer's append, straight to its lane while it owns one ------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *otherwise; /* called with the record while no lane is owned */
    PyObject *ring;      /* the owned lane's ring (a writable buffer), or NULL */
    Lane lane;
    vectorcallfunc vectorcall;
} Appender;

static PyTypeObject AppenderType;

/* The record in `data` appended to the owned lane: 1 published, 0 dropped (counted), -1 error;
   LANE_NOT_OWNED when no lane is owned (nothing done). For other extensions (the capsule). */
static int appender_write(PyObject *appender, const char *data, Py_ssize_t size)
{
    Appender *self = (Appender *)appender;
    if (self->ring == NULL)
        return LANE_NOT_OWNED;
    return ring_append(self->ring, &self->lane, data, size);
}

static PyObject *appender_call(PyObject *callable, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames)
{
    Appender *self = (Appender *)callable;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "an Appender takes one record");
        return NULL;
    }
    if (self->ring == NULL)
        return PyObject_CallOneArg(self->otherwise, args[0]);
    return append_buffer(self->ring, &self->lane, args[0]);
}

static PyObject *appender_new(PyTypeObject *type, PyObject *arguments, PyObject *keywords)
{
    PyObject *otherwise;
    if (!PyArg_ParseTuple(arguments, "O:Appender", &otherwise))
        return NULL;
    if (keywords != NULL && PyDict_GET_SIZE(keywords)) {
        PyErr_SetString(PyExc_TypeError, "Appender() takes no keyword arguments");
        return NULL;
    }
    Appender *self = (Appender *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->otherwise = Py_NewRef(otherwise);
    self->ring = NULL;
    self->vectorcall = appender_call;
    return (PyObject *)self;
}

static PyObject *appender_own(PyObject *object, PyObject *const *args, Py_ssize_t nargs)
{
    Appender *self = (Appender *)object;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "own() takes 6 arguments");
        return NULL;
    }
    Lane lane;
    if (lane_of(args + 1, &lane) < 0)
        return NULL;
    Py_buffer memory; /* checked now, so that a bad lane fails here rather than per record */
    if (PyObject_GetBuffer(args[0], &memory, PyBUF_WRITABLE) < 0)
        return NULL;
    int inside = lane_inside(&lane, memory.buf, memory.len);
    PyBuffer_Release(&memory);
    if (!inside)
        return NULL;
    self->lane = lane;
    Py_XSETREF(self->ring, Py_NewRef(args[0]));
    Py_RETURN_NONE;
}

static PyObject *appender_release(PyObject *object, PyObject *unused)
{
    (void)unused;
    Py_CLEAR(((Appender *)object)->ring);
    Py_RETURN_NONE;
}

static int appender_traverse(Appender *self, visitproc visit, void *arg)
{
    Py_VISIT(self->otherwise);
    Py_VISIT(self->ring);
    return 0;
}

static int appender_clear(Appender *self)
{
    Py_CLEAR(self->otherwise);
    Py_CLEAR(self->ring);
    return 0;
}

static void appender_dealloc(Appender *self)
{
    PyObject_GC_UnTrack(self);
    appender_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef appender_methods[] = {
    {"own", (PyCFunction)(void (*)(void))appender_own, METH_FASTCALL,
     "own(ring, control, base, capacity, max_record, max_records): from now on, append to\n"
     "this lane of `ring` (the arguments of append())."},
    {"release", appender_release, METH_NOARGS,
     "release(): from now on, hand each record to `otherwise`."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject AppenderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "moesif_fast.ringbuffer._lane.Appender",
    .tp_doc = "Appender(otherwise): called with a record, appends it to the lane given to own()\n"
              "as append() does and answers True (published) or False (dropped, counted); while\n"
              "it owns no lane (before own(), after release()), answers otherwise(record).",
    .tp_basicsize = sizeof(Appender),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = appender_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Appender, vectorcall),
    .tp_traverse = (traverseproc)appender_traverse,
    .tp_clear = (inquiry)appender_clear,
    .tp_dealloc = (destructor)appender_dealloc,
    .tp_methods = appender_methods,
};

/* -- Marker: the reader's mark, in C ------------------------------------------------------- */

/* Marker(words, lane_word, position_word, heartbeat_word): `Reader.mark` (reader.py, the Python
   reference) for the ring header whose 8-byte words `words` exports (writable), called once
   per record the shipper decodes; its `clear()` is `Reader.clear_mark`. The same stores in the
   same order: where the lane changes, the lane word is zeroed, the position stored, then the
   lane + 1, so that a process killed between two stores leaves no mark or a whole one; then the
   heartbeat (time.time_ns()). */

typedef struct {
    PyObject_HEAD
    PyObject *words;
    Py_ssize_t lane_word, position_word, heartbeat_word;
    long long marked_lane; /* the lane whose number is stored, -1 for none */
    vectorcallfunc vectorcall;
} Marker;

/* The header's words as a writable buffer holding `word` (and every word below), 8-aligned. */
static uint64_t *marker_words(Marker *self, Py_buffer *memory, Py_ssize_t word)
{
    if (PyObject_GetBuffer(self->words, memory, PyBUF_WRITABLE) < 0)
        return NULL;
    if (memory->len / 8 <= word || (uintptr_t)memory->buf % 8 != 0) {
        PyBuffer_Release(memory);
        PyErr_SetString(PyExc_ValueError, "the marker's words are outside the header");
        return NULL;
    }
    return (uint64_t *)memory->buf;
}

static PyObject *marker_call(PyObject *callable, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames)
{
    Marker *self = (Marker *)callable;
    if (PyVectorcall_NARGS(nargsf) != 2 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a Marker takes a lane and a position");
        return NULL;
    }
    unsigned long long lane = PyLong_AsUnsignedLongLong(args[0]);
    if (lane == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long position = PyLong_AsUnsignedLongLong(args[1]);
    if (position == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (lane >= LLONG_MAX) {
        PyErr_SetString(PyExc_OverflowError, "lane too large");
        return NULL;
    }
    struct timespec now;
    if (clock_gettime(CLOCK_REALTIME, &now) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_ssize_t highest = self->lane_word;
    if (self->position_word > highest)
        highest = self->position_word;
    if (self->heartbeat_word > highest)
        highest = self->heartbeat_word;
    Py_buffer memory;
    uint64_t *words = marker_words(self, &memory, highest);
    if (words == NULL)
        return NULL;
    if ((long long)lane != self->marked_lane) {
        __atomic_store_n(&words[self->lane_word], 0, __ATOMIC_RELEASE);
        __atomic_store_n(&words[self->position_word], position, __ATOMIC_RELEASE);
        __atomic_store_n(&words[self->lane_word], lane + 1, __ATOMIC_RELEASE);
        self->marked_lane = (long long)lane;
    } else {
        __atomic_store_n(&words[self->position_word], position, __ATOMIC_RELEASE);
    }
    __atomic_store_n(&words[self->heartbeat_word],
                     (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec,
                     __ATOMIC_RELEASE);
    PyBuffer_Release(&memory);
    Py_RETURN_NONE;
}

static PyObject *marker_new(PyTypeObject *type, PyObject *arguments, PyObject *keywords)
{
    PyObject *words;
    Py_ssize_t lane_word, position_word, heartbeat_word;
    if (!PyArg_ParseTuple(arguments, "Onnn:Marker", &words, &lane_word, &position_word,
                          &heartbeat_word))
        return NULL;
    if (keywords != NULL && PyDict_GET_SIZE(keywords)) {
        PyErr_SetString(PyExc_TypeError, "Marker() takes no keyword arguments");
        return NULL;
    }
    if (lane_word < 0 || position_word < 0 || heartbeat_word < 0) {
        PyErr_SetString(PyExc_ValueError, "word numbers must not be negative");
        return NULL;
    }
    Marker *self = (Marker *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->words = Py_NewRef(words);
    self->lane_word = lane_word;
    self->position_word = position_word;
    self->heartbeat_word = heartbeat_word;
    self->marked_lane = -1;
    self->vectorcall = marker_call;
    return (PyObject *)self;
}

static PyObject *marker_clear_mark(PyObject *object, PyObject *unused)
{
    (void)unused;
    Marker *self = (Marker *)object;
    Py_buffer memory;
    uint64_t *words = marker_words(self, &memory, self->lane_word);
    if (words == NULL)
        return NULL;
    __atomic_store_n(&words[self->lane_word], 0, __ATOMIC_RELEASE);
    self->marked_lane = -1;
    PyBuffer_Release(&memory);
    Py_RETURN_NONE;
}

static int marker_traverse(Marker *self, visitproc visit, void *arg)
{
    Py_VISIT(self->words);
    return 0;
}

static int marker_clear(Marker *self)
{
    Py_CLEAR(self->words);
    return 0;
}

static void marker_dealloc(Marker *self)
{
    PyObject_GC_UnTrack(self);
    marker_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef marker_methods[] = {
    {"clear", marker_clear_mark, METH_NOARGS,
     "clear(): no record is being decoded any more (Reader.clear_mark)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MarkerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "moesif_fast.ringbuffer._lane.Marker",
    .tp_doc = "Marker(words, lane_word, position_word, heartbeat_word): called with (lane,\n"
              "position), names that record in the ring's header as Reader.mark does.",
    .tp_basicsize = sizeof(Marker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = marker_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Marker, vectorcall),
    .tp_traverse = (traverseproc)marker_traverse,
    .tp_clear = (inquiry)marker_clear,
    .tp_dealloc = (destructor)marker_dealloc,
    .tp_methods = marker_methods,
};

/* scan(view, base, capacity, max_record, lane, position, tail, max_records, max_bytes, skip,
   batch) -> (position, taken, nbytes, damaged): the record loop of `Reader._read_lane`
   (reader.py, whose `_scan_lane` is the Python reference), in C: it costs about
   2 µs per record in Python, once per event the shipper reads. From `position` up to `tail`
   of the lane at `base` in `view`, it appends at most `max_records` records of at most
   `max_bytes` bytes in all (at least one when any is there) to batch.records, batch.lanes
   and batch.positions, steps over padding, and passes over a poison record (a position in
   the set `skip`, removed from it and appended to batch.skipped as (lane, position, size)).
   It stops at the first header that is not consistent (`damaged` true: the caller resets the
   lane) without appending that record.

   The ring is shared memory that other processes write: each record header is copied once
   into locals before it is checked (so it cannot change between check and use), and every
   read stays inside the lane, which must lie inside `view` (ValueError otherwise). Lengths
   are 32 bits and positions below 2^62, so no sum overflows 64 bits. */

static uint64_t load_le(const unsigned char *bytes, int count)
{
    uint64_t value = 0;
    for (int index = count - 1; index >= 0; index--)
        value = (value << 8) | bytes[index];
    return value;
}

static int append_record(PyObject *records, PyObject *lanes, PyObject *positions,
                         const unsigned char *start, uint64_t size, PyObject *lane,
                         uint64_t position)
{
    PyObject *record = PyBytes_FromStringAndSize((const char *)start, (Py_ssize_t)size);
    if (record == NULL)
        return -1;
    int failed = PyList_Append(records, record);
    Py_DECREF(record);
    if (failed || PyList_Append(lanes, lane) < 0)
        return -1;
    PyObject *number = PyLong_FromUnsignedLongLong(position);
    if (number == NULL)
        return -1;
    failed = PyList_Append(positions, number);
    Py_DECREF(number);
    return failed;
}

static int skip_record(PyObject *skip, PyObject *skipped, PyObject *lane, uint64_t position,
                       uint64_t size, int *is_poison)
{
    *is_poison = 0;
    if (skip == Py_None)
        return 0;
    PyObject *key = PyLong_FromUnsignedLongLong(position);
    if (key == NULL)
        return -1;
    int found = PySet_Discard(skip, key);
    if (found == 1) {
        *is_poison = 1;
        PyObject *entry = Py_BuildValue("(OOK)", lane, key, (unsigned long long)size);
        found = entry == NULL ? -1 : PyList_Append(skipped, entry);
        Py_XDECREF(entry);
    }
    Py_DECREF(key);
    return found < 0 ? -1 : 0;
}

static PyObject *batch_list(PyObject *batch, const char *name)
{
    PyObject *list = PyObject_GetAttrString(batch, name);
    if (list != NULL && !PyList_CheckExact(list)) {
        PyErr_Format(PyExc_TypeError, "batch.%s must be a list", name);
        Py_CLEAR(list);
    }
    return list;
}

static PyObject *scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "scan takes 11 arguments");
        return NULL;
    }
    static const int NUMBER_ARGUMENTS[7] = {1, 2, 3, 5, 6, 7, 8};
    uint64_t numbers[7];  /* base, capacity, max_record, position, tail, max_records, max_bytes */
    for (int index = 0; index < 7; index++) {
        unsigned long long value = PyLong_AsUnsignedLongLong(args[NUMBER_ARGUMENTS[index]]);
        if (value == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
        numbers[index] = value;
    }
    uint64_t base = numbers[0], capacity = numbers[1], max_record = numbers[2];
    uint64_t position = numbers[3], tail = numbers[4], max_records = numbers[5];
    uint64_t max_bytes = numbers[6];
    PyObject *lane = args[4], *skip = args[9], *batch = args[10];
    if (skip != Py_None && !PySet_CheckExact(skip)) {
        PyErr_SetString(PyExc_TypeError, "skip must be a set or None");
        return NULL;
    }
    if (capacity < RECORD_HEADER_BYTES || (capacity & (capacity - 1))) {
        PyErr_SetString(PyExc_ValueError, "capacity must be a power of two of 16 or more");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *records = NULL, *lanes = NULL, *positions = NULL, *skipped = NULL;
    PyObject *result = NULL;
    if ((uint64_t)view.len < capacity || base > (uint64_t)view.len - capacity) {
        PyErr_SetString(PyExc_ValueError, "the lane is not inside the view");
        goto done;
    }
    records = batch_list(batch, "records");
    lanes = records == NULL ? NULL : batch_list(batch, "lanes");
    positions = lanes == NULL ? NULL : batch_list(batch, "positions");
    skipped = positions == NULL ? NULL : batch_list(batch, "skipped");
    if (skipped == NULL)
        goto done;
    const unsigned char *lane_bytes = (const unsigned char *)view.buf + base;
    uint64_t taken = 0, nbytes = 0;
    int damaged = 0;
    while (position < tail && taken < max_records && nbytes < max_bytes) {
        uint64_t offset = position & (capacity - 1), room = capacity - offset;
        if (room < RECORD_HEADER_BYTES) {  /* only an unaligned position: damaged */
            damaged = 1;
            break;
        }
        unsigned char header[RECORD_HEADER_BYTES];  /* "<IHHQ": size, kind, 0, own position */
        memcpy(header, lane_bytes + offset, RECORD_HEADER_BYTES);
        uint64_t size = load_le(header, 4), kind = load_le(header + 4, 2);
        if (load_le(header + 8, 8) != position) {
            damaged = 1;
            break;
        }
        if (kind == KIND_PAD) {
            if (size != room - RECORD_HEADER_BYTES || position + room > tail) {
                damaged = 1;
                break;
            }
            position += room;
            continue;
        }
        uint64_t span = (size + 31) & ~(uint64_t)15;
        if (kind != KIND_RECORD || size > max_record || span > room || position + span > tail) {
            damaged = 1;
            break;
        }
        int is_poison;
        if (skip_record(skip, skipped, lane, position, size, &is_poison) < 0)
            goto done;
        if (!is_poison) {
            if (append_record(records, lanes, positions,
                              lane_bytes + offset + RECORD_HEADER_BYTES, size, lane,
                              position) < 0)
                goto done;
            nbytes += size;
        }
        position += span;
        taken += 1;
    }
    result = Py_BuildValue("(KKKO)", (unsigned long long)position, (unsigned long long)taken,
                           (unsigned long long)nbytes, damaged ? Py_True : Py_False);
done:
    Py_XDECREF(records);
    Py_XDECREF(lanes);
    Py_XDECREF(positions);
    Py_XDECREF(skipped);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"append", (PyCFunction)(void (*)(void))append, METH_FASTCALL,
     "append(ring, control, base, capacity, max_record, max_records, record) -> bool: "
     "Producer._append in C (see producer.py)."},
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(view, base, capacity, max_record, lane, position, tail, max_records, max_bytes, "
     "skip, batch) -> (position, taken, nbytes, damaged): Reader._read_lane's record loop."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "moesif_fast.ringbuffer._lane",
    .m_doc = "A producer's append to its lane (a function, and the Appender a producer holds), "
             "and the reader's record loop and mark, in C (see producer.py, reader.py and "
             "_lane.h).",
    .m_size = -1,
    .m_methods = methods,
};

static LaneAPI api = {&AppenderType, appender_write};

PyMODINIT_FUNC PyInit__lane(void)
{
    if (PyType_Ready(&AppenderType) < 0 || PyType_Ready(&MarkerType) < 0)
        return NULL;
    PyObject *self = PyModule_Create(&module);
    if (self == NULL)
        return NULL;
    PyObject *capsule = PyCapsule_New(&api, LANE_API_CAPSULE, NULL);
    if (capsule == NULL || PyModule_AddObjectRef(self, "API", capsule) < 0
            || PyModule_AddObjectRef(self, "Appender", (PyObject *)&AppenderType) < 0
            || PyModule_AddObjectRef(self, "Marker", (PyObject *)&MarkerType) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(self);
        return NULL;
    }
    Py_DECREF(capsule);
    return self;
}
