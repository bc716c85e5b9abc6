/* moesif_fast._recorddecode: a CALL_V4 ring record read into a CapturedCall, in C.

`Decoder(CapturedCall)` holds the record's namedtuple type; `Decoder.decode(payload)` returns the
CapturedCall that `record.decode(payload)` returns, built straight from the MessagePack bytes,
or NotImplemented ("not mine") for any payload it leaves to the Python path (record.py then runs
that path, the reference). It handles the common record only: bytes holding the kind byte b"F"
and one MessagePack array of the 19 fields, each of its expected type, request header values
all strings, callback results (user_id ... metadata) None, bools, ints, floats or strings. It
declines everything else: other kinds, ext types anywhere, maps, header values of other types,
callback results of other types, invalid UTF-8, wrong lengths, trailing bytes, truncation.
Declining is always safe: the Python path then gives its own answer, None included.

The payload comes from shared memory another process writes, so nothing in it is trusted: every
length is checked against the bytes left before anything is read or allocated for it, lengths
are at most 32 bits (no overflow in a Py_ssize_t), and the reader follows the fixed schema with
no recursion.

Two shortcuts, neither visible in the values: short ASCII strings are shared with earlier
records (see CACHE_SLOTS), and the call and its tuples are not tracked by the garbage collector
(see Decoder_decode). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define OK 0
#define DECLINE 1 /* left to the Python path: decode returns NotImplemented */
#define ERROR (-1) /* a Python exception is set; decode clears it and declines */

#define FIELD_COUNT 19 /* len(CapturedCall._fields) */
#define REQUEST_HEADERS_FIELD 5
#define RESPONSE_HEADERS_FIELD 9

/* What a scalar field may hold (a bit set). */
#define NIL 1u
#define BOOL 2u
#define INT 4u
#define FLOAT 8u
#define STR 16u
#define BIN 32u
#define BODY (BIN | INT | NIL)
#define CALLBACK_RESULT (NIL | BOOL | INT | FLOAT | STR)
#define HEADERS 0u /* the two header fields, read by their own functions */

/* The types `record.decode` accepts for each field, in wire order. */
static const unsigned FIELD_KINDS[FIELD_COUNT] = {
    STR,             /* direction */
    INT,             /* request_time_ns */
    INT,             /* response_time_ns */
    STR,             /* verb */
    STR,             /* uri */
    HEADERS,         /* request_headers: [names, values] */
    STR | NIL,       /* remote_addr */
    BODY,            /* request_body */
    INT,             /* status */
    HEADERS,         /* response_headers: [[name, value], ...] */
    BODY,            /* response_body */
    STR | NIL,       /* transaction_id */
    CALLBACK_RESULT, /* user_id */
    CALLBACK_RESULT, /* company_id */
    CALLBACK_RESULT, /* session_token */
    CALLBACK_RESULT, /* metadata */
    INT,             /* weight */
    STR | NIL,       /* blocked_by */
    INT,             /* settings_tag */
};

/* --- MessagePack reader -------------------------------------------------------------------- */

/* Short ASCII strings repeat from one record to the next (header names and most values, the
   direction, the verb): the decoder keeps the last one seen in each of CACHE_SLOTS slots, by a
   hash of its bytes, and hands out that same str when the bytes are equal. */
#define CACHE_SLOTS 512 /* a power of two */
#define CACHED_MAX 64   /* longest string looked up, in bytes */

typedef struct {
    const unsigned char *at;
    const unsigned char *end;
    PyObject **strings; /* the decoder's cache: CACHE_SLOTS slots, each NULL or an ASCII str */
} Reader;

static Py_ssize_t remaining(const Reader *reader)
{
    return reader->end - reader->at;
}

/* The next `size` bytes (1 to 8) as a big-endian unsigned number; DECLINE when fewer are left. */
static int read_uint(Reader *reader, int size, uint64_t *value)
{
    if (remaining(reader) < size)
        return DECLINE;
    uint64_t number = 0;
    for (int index = 0; index < size; index++)
        number = (number << 8) | reader->at[index];
    reader->at += size;
    *value = number;
    return OK;
}

/* The length of a str, bin or array, held in the `size` bytes after its type byte (at most 4:
   below 2**32), checked against the bytes left: a str or bin of `length` bytes, or an array
   of `length` items of at least one byte each, fits in them. */
static int read_length(Reader *reader, int size, Py_ssize_t *length)
{
    uint64_t value;
    if (read_uint(reader, size, &value) != OK)
        return DECLINE;
    if (value > (uint64_t)remaining(reader))
        return DECLINE;
    *length = (Py_ssize_t)value;
    return OK;
}

/* An array's item count (at least one byte is left per item), or DECLINE for any other type. */
static int read_array_header(Reader *reader, Py_ssize_t *count)
{
    if (remaining(reader) < 1)
        return DECLINE;
    unsigned char type = *reader->at++;
    if (type >= 0x90 && type <= 0x9f) {
        if ((Py_ssize_t)(type & 0x0f) > remaining(reader))
            return DECLINE;
        *count = type & 0x0f;
        return OK;
    }
    if (type == 0xdc)
        return read_length(reader, 2, count);
    if (type == 0xdd)
        return read_length(reader, 4, count);
    return DECLINE;
}

/* The str of the next `length` bytes (UTF-8, lone surrogates allowed; the caller has checked
   that they are there), or NULL with UnicodeDecodeError set. The cache is only a shortcut: an ASCII str whose bytes equal the
   input is the str the input decodes to. */
static PyObject *new_str(Reader *reader, Py_ssize_t length)
{
    const unsigned char *data = reader->at;
    reader->at += length;
    if (length < 2 || length > CACHED_MAX)  /* CPython keeps "" and 1-character strings */
        return PyUnicode_DecodeUTF8((const char *)data, length, "surrogatepass");
    uint32_t hash = 2166136261u;  /* FNV-1a */
    for (Py_ssize_t index = 0; index < length; index++)
        hash = (hash ^ data[index]) * 16777619u;
    PyObject **slot = &reader->strings[hash & (CACHE_SLOTS - 1)];
    if (*slot != NULL && PyUnicode_GET_LENGTH(*slot) == length
            && memcmp(PyUnicode_1BYTE_DATA(*slot), data, (size_t)length) == 0)
        return Py_NewRef(*slot);
    PyObject *text = PyUnicode_DecodeUTF8((const char *)data, length, "surrogatepass");
    if (text != NULL && PyUnicode_IS_ASCII(text))
        Py_XSETREF(*slot, Py_NewRef(text));
    return text;
}

/* One scalar of a type in `allowed` as a new reference in *value; DECLINE for any other type
   (ext types, arrays, maps, the unused byte 0xc1 included) and for a length past the end. */
static int read_scalar(Reader *reader, unsigned allowed, PyObject **value)
{
    if (remaining(reader) < 1)
        return DECLINE;
    unsigned char type = *reader->at++;
    Py_ssize_t length;
    uint64_t bits;
    if (type <= 0x7f || type >= 0xe0) {  /* positive and negative fixint */
        if (!(allowed & INT))
            return DECLINE;
        *value = PyLong_FromLong(type <= 0x7f ? (long)type : (long)type - 256);
    }
    else if (type >= 0xa0 && type <= 0xbf) {  /* fixstr */
        length = type & 0x1f;
        if (!(allowed & STR) || length > remaining(reader))
            return DECLINE;
        *value = new_str(reader, length);
    }
    else {
        switch (type) {
        case 0xc0:
            if (!(allowed & NIL))
                return DECLINE;
            *value = Py_NewRef(Py_None);
            break;
        case 0xc2:
        case 0xc3:
            if (!(allowed & BOOL))
                return DECLINE;
            *value = Py_NewRef(type == 0xc3 ? Py_True : Py_False);
            break;
        case 0xc4:
        case 0xc5:
        case 0xc6:  /* bin 8, 16, 32 */
            if (!(allowed & BIN) || read_length(reader, 1 << (type - 0xc4), &length) != OK)
                return DECLINE;
            *value = PyBytes_FromStringAndSize((const char *)reader->at, length);
            reader->at += length;
            break;
        case 0xd9:
        case 0xda:
        case 0xdb:  /* str 8, 16, 32 */
            if (!(allowed & STR) || read_length(reader, 1 << (type - 0xd9), &length) != OK)
                return DECLINE;
            *value = new_str(reader, length);
            break;
        case 0xca: {  /* float 32 */
            float single;
            uint32_t word;
            if (!(allowed & FLOAT) || read_uint(reader, 4, &bits) != OK)
                return DECLINE;
            word = (uint32_t)bits;
            memcpy(&single, &word, sizeof single);
            *value = PyFloat_FromDouble((double)single);
            break;
        }
        case 0xcb: {  /* float 64 */
            double number;
            if (!(allowed & FLOAT) || read_uint(reader, 8, &bits) != OK)
                return DECLINE;
            memcpy(&number, &bits, sizeof number);
            *value = PyFloat_FromDouble(number);
            break;
        }
        case 0xcc:
        case 0xcd:
        case 0xce:
        case 0xcf:  /* uint 8, 16, 32, 64 */
            if (!(allowed & INT) || read_uint(reader, 1 << (type - 0xcc), &bits) != OK)
                return DECLINE;
            *value = PyLong_FromUnsignedLongLong(bits);
            break;
        case 0xd0:
        case 0xd1:
        case 0xd2:
        case 0xd3: {  /* int 8, 16, 32, 64: sign-extended from their width */
            int size = 1 << (type - 0xd0);
            if (!(allowed & INT) || read_uint(reader, size, &bits) != OK)
                return DECLINE;
            uint64_t sign = (uint64_t)1 << (size * 8 - 1);
            *value = PyLong_FromLongLong(
                (bits & sign) ? -(long long)((sign << 1) - bits - 1) - 1 : (long long)bits);
            break;
        }
        default:
            return DECLINE;
        }
    }
    return *value == NULL ? ERROR : OK;
}

/* --- the header fields --------------------------------------------------------------------- */

/* An array of `count` strings as a new tuple in *column. */
static int read_str_column(Reader *reader, Py_ssize_t count, PyObject **column)
{
    PyObject *tuple = PyTuple_New(count);
    if (tuple == NULL)
        return ERROR;
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *item;
        int status = read_scalar(reader, STR, &item);
        if (status != OK) {
            Py_DECREF(tuple);
            return status;
        }
        PyTuple_SET_ITEM(tuple, index, item);
    }
    PyObject_GC_UnTrack(tuple);  /* see Decoder_decode */
    *column = tuple;
    return OK;
}

/* [names, values], two arrays of strings of one length, as (names, values) tuples. Any value
   that is not a string declines: the Python path flattens those. */
static int read_request_headers(Reader *reader, PyObject **headers)
{
    Py_ssize_t count, value_count;
    PyObject *names, *values;
    int status = read_array_header(reader, &count);
    if (status != OK || count != 2)
        return DECLINE;
    if ((status = read_array_header(reader, &count)) != OK)
        return status;
    if ((status = read_str_column(reader, count, &names)) != OK)
        return status;
    if ((status = read_array_header(reader, &value_count)) != OK || value_count != count) {
        Py_DECREF(names);
        return DECLINE;
    }
    if ((status = read_str_column(reader, count, &values)) != OK) {
        Py_DECREF(names);
        return status;
    }
    *headers = PyTuple_Pack(2, names, values);
    Py_DECREF(names);
    Py_DECREF(values);
    if (*headers == NULL)
        return ERROR;
    PyObject_GC_UnTrack(*headers);
    return OK;
}

/* An array of [name, value] arrays of two strings, as a tuple of 2-tuples. */
static int read_response_headers(Reader *reader, PyObject **headers)
{
    Py_ssize_t count, size;
    int status = read_array_header(reader, &count);
    if (status != OK)
        return status;
    PyObject *pairs = PyTuple_New(count);
    if (pairs == NULL)
        return ERROR;
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *pair;
        status = read_array_header(reader, &size);
        if (status == OK && size != 2)
            status = DECLINE;
        if (status == OK)
            status = read_str_column(reader, 2, &pair);
        if (status != OK) {
            Py_DECREF(pairs);
            return status;
        }
        PyTuple_SET_ITEM(pairs, index, pair);
    }
    PyObject_GC_UnTrack(pairs);
    *headers = pairs;
    return OK;
}

/* --- Decoder -------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyTypeObject *call_type; /* CapturedCall: a tuple subclass, no __dict__ or __weakref__ */
    PyObject *strings[CACHE_SLOTS];
} Decoder;

/* The record's fields into `call` (a fresh CapturedCall of FIELD_COUNT empty slots). */
static int read_call(Reader *reader, PyObject *call)
{
    Py_ssize_t count;
    int status = read_array_header(reader, &count);
    if (status != OK || count != FIELD_COUNT)
        return DECLINE;
    for (Py_ssize_t index = 0; index < FIELD_COUNT; index++) {
        PyObject *item;
        if (index == REQUEST_HEADERS_FIELD)
            status = read_request_headers(reader, &item);
        else if (index == RESPONSE_HEADERS_FIELD)
            status = read_response_headers(reader, &item);
        else
            status = read_scalar(reader, FIELD_KINDS[index], &item);
        if (status != OK)
            return status;
        PyTuple_SET_ITEM(call, index, item);
    }
    return remaining(reader) == 0 ? OK : DECLINE;  /* bytes after the one object */
}

static PyObject *Decoder_decode(Decoder *self, PyObject *payload)
{
    if (self->call_type == NULL || !PyBytes_CheckExact(payload))
        Py_RETURN_NOTIMPLEMENTED;
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(payload);
    Py_ssize_t size = PyBytes_GET_SIZE(payload);
    if (size < 1 || data[0] != 'F')
        Py_RETURN_NOTIMPLEMENTED;
    Reader reader = {data + 1, data + size, self->strings};
    /* Slots are NULL until filled; tuple deallocation and traversal skip NULL slots. */
    PyObject *call = self->call_type->tp_alloc(self->call_type, FIELD_COUNT);
    if (call == NULL) {
        PyErr_Clear();
        Py_RETURN_NOTIMPLEMENTED;
    }
    int status = read_call(&reader, call);
    if (status == OK) {
        /* The call and its tuples hold only str, bytes, int, float, bool, None and such tuples,
           and the call type has no __dict__ (Decoder_init checks its size): they can be part
           of no reference cycle, so the garbage collector need not look at them. (It untracks
           such plain tuples itself at its first pass over them.) Measured: a third less time
           for a batch of calls kept alive together. */
        PyObject_GC_UnTrack(call);
        return call;
    }
    Py_DECREF(call);
    if (status == ERROR)  /* invalid UTF-8 (UnicodeDecodeError), or out of memory */
        PyErr_Clear();
    Py_RETURN_NOTIMPLEMENTED;
}

static int Decoder_init(Decoder *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"call_type", NULL};
    PyTypeObject *call_type;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!", keywords, &PyType_Type, &call_type))
        return -1;
    if (!PyType_IsSubtype(call_type, &PyTuple_Type)
            || call_type->tp_basicsize != PyTuple_Type.tp_basicsize
            || call_type->tp_itemsize != PyTuple_Type.tp_itemsize) {
        PyErr_SetString(PyExc_TypeError,
                        "call_type must be a tuple subclass with no fields of its own");
        return -1;
    }
    PyObject *names = PyObject_GetAttrString((PyObject *)call_type, "_fields");
    if (names == NULL)
        return -1;
    Py_ssize_t count = PyObject_Length(names);
    Py_DECREF(names);
    if (count < 0)
        return -1;
    if (count != FIELD_COUNT) {
        PyErr_Format(PyExc_ValueError, "call_type must have %d fields, not %zd", FIELD_COUNT,
                     count);
        return -1;
    }
    Py_INCREF(call_type);
    Py_XSETREF(self->call_type, call_type);
    return 0;
}

static int Decoder_traverse(Decoder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->call_type);
    return 0;
}

static int Decoder_clear(Decoder *self)
{
    Py_CLEAR(self->call_type);
    for (int index = 0; index < CACHE_SLOTS; index++)
        Py_CLEAR(self->strings[index]);
    return 0;
}

static void Decoder_dealloc(Decoder *self)
{
    PyObject_GC_UnTrack(self);
    Decoder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Decoder_methods[] = {
    {"decode", (PyCFunction)Decoder_decode, METH_O,
     "decode(payload) -> CapturedCall | NotImplemented: record.decode(payload) for a common "
     "call record, or NotImplemented to use the Python path."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "moesif_fast._recorddecode.Decoder",
    .tp_doc = "The compiled record.decode for CALL_V4 records of the common shape "
              "(see record.py).",
    .tp_basicsize = sizeof(Decoder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Decoder_init,
    .tp_dealloc = (destructor)Decoder_dealloc,
    .tp_traverse = (traverseproc)Decoder_traverse,
    .tp_clear = (inquiry)Decoder_clear,
    .tp_methods = Decoder_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "moesif_fast._recorddecode",
    .m_doc = "A CALL_V4 ring record read into a CapturedCall, in C (see record.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__recorddecode(void)
{
    if (PyType_Ready(&DecoderType) < 0)
        return NULL;
    PyObject *result = PyModule_Create(&module);
    if (result == NULL)
        return NULL;
    if (PyModule_AddObjectRef(result, "Decoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}
