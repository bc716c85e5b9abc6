/* moesif_fast._recordpack: the worker's record of a captured call, packed in C.

`pack_call(fields)` returns the bytes `record.encode_call(fields)` returns (the kind byte b"F",
then the fields as one MessagePack array, exactly as msgpack's Packer writes them), or None for
any value it leaves to the Python path (record.py then runs that path, the reference): types
other than exactly None, bool, int, float, str, bytes, tuple, list and dict, ints outside
MessagePack's 64 bits, strings that are not valid UTF-8 (lone surrogates), containers nested
deeper than MAX_DEPTH, and containers of more than 2^32 - 1 items.

Only exact built-in types are read, so no Python code runs while a value is packed and no
container can change under the packer. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_buffer.h"

#define OK 0
#define DECLINE 1 /* left to the Python path: None is returned */
#define ERROR (-1) /* a Python exception is set */

#define MAX_DEPTH 64 /* nesting packed here; deeper values go the Python way */
#define CALL_KIND 'F' /* record.CALL_V4 */

static int put_byte(Buffer *buffer, unsigned char byte)
{
    if (buffer_reserve(buffer, 1) < 0)
        return ERROR;
    buffer->data[buffer->length++] = (char)byte;
    return OK;
}

/* `marker`, then `value` big-endian in `size` bytes (0, 1, 2, 4 or 8). */
static int put_number(Buffer *buffer, unsigned char marker, uint64_t value, int size)
{
    if (buffer_reserve(buffer, 1 + size) < 0)
        return ERROR;
    unsigned char *out = (unsigned char *)buffer->data + buffer->length;
    out[0] = marker;
    for (int index = 0; index < size; index++)
        out[1 + index] = (unsigned char)(value >> (8 * (size - 1 - index)));
    buffer->length += 1 + size;
    return OK;
}

/* A header of a str, bin, array or map of `count` items: the fixed form below `fixed_limit`
   (0 when there is none), else the 8-bit form (marker8 0: none), else 16, else 32 bits. */
static int put_header(Buffer *buffer, Py_ssize_t count, unsigned char fixed, Py_ssize_t fixed_limit,
                      unsigned char marker8, unsigned char marker16, unsigned char marker32)
{
    if (count < fixed_limit)
        return put_byte(buffer, (unsigned char)(fixed | count));
    if (marker8 && count < 0x100)
        return put_number(buffer, marker8, (uint64_t)count, 1);
    if (count < 0x10000)
        return put_number(buffer, marker16, (uint64_t)count, 2);
    if ((uint64_t)count <= 0xffffffffu)
        return put_number(buffer, marker32, (uint64_t)count, 4);
    return DECLINE;
}

static int pack(Buffer *buffer, PyObject *value, int depth);

static int pack_int(Buffer *buffer, PyObject *value)
{
    int overflow = 0;
    long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (number == -1 && PyErr_Occurred())
        return ERROR;
    if (overflow < 0)
        return DECLINE; /* below -2^63: ext type 1, in Python */
    if (overflow > 0) {
        unsigned long long big = PyLong_AsUnsignedLongLong(value);
        if (big == (unsigned long long)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return ERROR;
            PyErr_Clear();
            return DECLINE; /* 2^64 or more */
        }
        return put_number(buffer, 0xcf, big, 8);
    }
    if (number >= 0) {
        uint64_t positive = (uint64_t)number;
        if (positive < 0x80)
            return put_byte(buffer, (unsigned char)positive);
        if (positive < 0x100)
            return put_number(buffer, 0xcc, positive, 1);
        if (positive < 0x10000)
            return put_number(buffer, 0xcd, positive, 2);
        if (positive <= 0xffffffffu)
            return put_number(buffer, 0xce, positive, 4);
        return put_number(buffer, 0xcf, positive, 8);
    }
    if (number >= -32)
        return put_byte(buffer, (unsigned char)(0xe0 | (number + 32)));
    if (number >= -128)
        return put_number(buffer, 0xd0, (uint64_t)number, 1);
    if (number >= -32768)
        return put_number(buffer, 0xd1, (uint64_t)number, 2);
    if (number >= INT32_MIN)
        return put_number(buffer, 0xd2, (uint64_t)number, 4);
    return put_number(buffer, 0xd3, (uint64_t)number, 8);
}

static int pack_str(Buffer *buffer, PyObject *value)
{
    Py_ssize_t size;
    const char *text = PyUnicode_AsUTF8AndSize(value, &size);
    if (text == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            return ERROR;
        PyErr_Clear();
        return DECLINE; /* a lone surrogate: the Python path writes it with surrogatepass */
    }
    int status = put_header(buffer, size, 0xa0, 32, 0xd9, 0xda, 0xdb);
    return status != OK ? status : buffer_write(buffer, text, size);
}

static int pack_sequence(Buffer *buffer, PyObject *value, int depth)
{
    Py_ssize_t count = PySequence_Fast_GET_SIZE(value);
    int status = put_header(buffer, count, 0x90, 16, 0, 0xdc, 0xdd);
    if (status != OK)
        return status;
    PyObject **items = PySequence_Fast_ITEMS(value);
    for (Py_ssize_t index = 0; index < count; index++) {
        status = pack(buffer, items[index], depth + 1);
        if (status != OK)
            return status;
    }
    return OK;
}

static int pack_dict(Buffer *buffer, PyObject *value, int depth)
{
    int status = put_header(buffer, PyDict_GET_SIZE(value), 0x80, 16, 0, 0xde, 0xdf);
    if (status != OK)
        return status;
    Py_ssize_t position = 0;
    PyObject *key, *item;
    while (PyDict_Next(value, &position, &key, &item)) {
        status = pack(buffer, key, depth + 1);
        if (status == OK)
            status = pack(buffer, item, depth + 1);
        if (status != OK)
            return status;
    }
    return OK;
}

static int pack(Buffer *buffer, PyObject *value, int depth)
{
    if (depth > MAX_DEPTH)
        return DECLINE;
    if (value == Py_None)
        return put_byte(buffer, 0xc0);
    if (value == Py_False)
        return put_byte(buffer, 0xc2);
    if (value == Py_True)
        return put_byte(buffer, 0xc3);
    PyTypeObject *type = Py_TYPE(value);
    if (type == &PyUnicode_Type)
        return pack_str(buffer, value);
    if (type == &PyLong_Type)
        return pack_int(buffer, value);
    if (type == &PyBytes_Type) {
        Py_ssize_t size = PyBytes_GET_SIZE(value);
        int status = put_header(buffer, size, 0, 0, 0xc4, 0xc5, 0xc6);
        return status != OK ? status : buffer_write(buffer, PyBytes_AS_STRING(value), size);
    }
    if (type == &PyTuple_Type || type == &PyList_Type)
        return pack_sequence(buffer, value, depth);
    if (type == &PyFloat_Type) {
        double number = PyFloat_AS_DOUBLE(value);
        uint64_t bits;
        memcpy(&bits, &number, sizeof bits);
        return put_number(buffer, 0xcb, bits, 8);
    }
    if (type == &PyDict_Type)
        return pack_dict(buffer, value, depth);
    return DECLINE;
}

static PyObject *pack_call(PyObject *module, PyObject *fields)
{
    (void)module;
    Buffer buffer;
    buffer_init(&buffer);
    buffer.data[buffer.length++] = CALL_KIND;
    int status = pack(&buffer, fields, 0);
    PyObject *result = NULL;
    if (status == OK)
        result = PyBytes_FromStringAndSize(buffer.data, buffer.length);
    else if (status == DECLINE)
        result = Py_NewRef(Py_None);
    buffer_free(&buffer);
    return result;
}

static PyMethodDef methods[] = {
    {"pack_call", pack_call, METH_O,
     "pack_call(fields) -> the record's bytes (record.encode_call), or None: Python packs it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "moesif_fast._recordpack",
    .m_doc = "The worker's record of a captured call, packed in C (see record.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__recordpack(void)
{
    return PyModule_Create(&module);
}
