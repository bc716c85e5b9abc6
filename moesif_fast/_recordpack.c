/* moesif_fast._recordpack: the worker's record of a captured call, packed in C.

`pack_call(fields)` returns the bytes `record.encode_call(fields)` returns (the kind byte b"F",
then the fields as one MessagePack array, exactly as msgpack's Packer writes them), or None for
any value it leaves to the Python path (record.py then runs that path, the reference): types
other than exactly None, bool, int, float, str, bytes, tuple, list and dict, ints outside
MessagePack's 64 bits, strings that are not valid UTF-8 (lone surrogates), containers nested
deeper than MAX_DEPTH, and containers of more than 2^32 - 1 items.

`pack_incoming(...)` returns the same bytes for an incoming call straight from the live
request's META dict and the response's header store, for the fields the middleware would
otherwise gather first (the URI, the request header columns, REMOTE_ADDR, the response header
pairs); None when any of them is not in the plain form it handles (see its docstring): the
middleware then gathers the fields in Python.

`transaction_id()` returns a random version-4 UUID string in the middleware's format.

Only exact built-in types are read, so no Python code runs while a value is packed and no
container can change under the packer. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <pthread.h>
#include <sys/random.h>

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

/* What a packing function returns for `status`: the record's bytes, None (declined) or NULL
   (an exception is set). Frees the buffer. */
static PyObject *packed(Buffer *buffer, int status)
{
    PyObject *result = NULL;
    if (status == OK)
        result = PyBytes_FromStringAndSize(buffer->data, buffer->length);
    else if (status == DECLINE)
        result = Py_NewRef(Py_None);
    buffer_free(buffer);
    return result;
}

static PyObject *pack_call(PyObject *module, PyObject *fields)
{
    (void)module;
    Buffer buffer;
    buffer_init(&buffer);
    buffer.data[buffer.length++] = CALL_KIND;
    return packed(&buffer, pack(&buffer, fields, 0));
}

/* -- an incoming call, from the live request and response -------------------------------- */

/* Interned at import: the META keys read here, and the direction written. */
static PyObject *key_wsgi_url_scheme, *key_http_host, *key_http_x_forwarded_host,
    *key_server_name, *key_server_port, *key_query_string, *key_remote_addr, *key_content_type,
    *key_content_length, *direction_incoming;

#define FIELD_COUNT 19 /* record.CapturedCall's fields */
#define INCOMING_ARGUMENTS 19

/* The characters django.utils.encoding's escape_uri_path (path) and iri_to_uri (query) leave
   as they are: the middleware's _is_plain_path and _is_plain_query. */
static const char PLAIN_PATH[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                                 "_.~/:@&+$,!*'()-";
static const char PLAIN_QUERY[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                                  "_.~/#%[]=:;$&()+,!?*@'-";
static unsigned char plain_path[128], plain_query[128];

static int is_plain(PyObject *text, const unsigned char *table)
{
    if (!PyUnicode_IS_ASCII(text))
        return 0;
    const unsigned char *chars = PyUnicode_1BYTE_DATA(text);
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    for (Py_ssize_t index = 0; index < length; index++)
        if (!table[chars[index]])
            return 0;
    return 1;
}

/* meta[key] as a borrowed reference; NULL when absent (an error set only if one occurred). */
static PyObject *meta_item(PyObject *meta, PyObject *key)
{
    return PyDict_GetItemWithError(meta, key);
}

/* `text`'s UTF-8 in *utf8 and *size: OK, DECLINE (not an exact str, or a lone surrogate) or
   ERROR. */
static int utf8_of(PyObject *text, const char **utf8, Py_ssize_t *size)
{
    if (!PyUnicode_CheckExact(text))
        return DECLINE;
    if ((*utf8 = PyUnicode_AsUTF8AndSize(text, size)) != NULL)
        return OK;
    if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
        return ERROR;
    PyErr_Clear();
    return DECLINE;
}

/* The host part of the middleware's _uri: X-Forwarded-Host (when `forwarded_host`), else
   Host, else SERVER_NAME with ":SERVER_PORT" unless it is the scheme's default port. */
static int host_of(PyObject *meta, int forwarded_host, int https, const char **host,
                   Py_ssize_t *host_size, const char **port, Py_ssize_t *port_size)
{
    *port_size = 0;
    PyObject *value = forwarded_host ? meta_item(meta, key_http_x_forwarded_host) : NULL;
    if (value == NULL && !PyErr_Occurred())
        value = meta_item(meta, key_http_host);
    if (value != NULL)
        return utf8_of(value, host, host_size);
    if (PyErr_Occurred())
        return ERROR;
    PyObject *name = meta_item(meta, key_server_name);
    PyObject *number = name != NULL ? meta_item(meta, key_server_port) : NULL;
    if (name == NULL || number == NULL)
        return PyErr_Occurred() ? ERROR : DECLINE; /* absent: "" in Python, never in Django */
    int status = utf8_of(name, host, host_size);
    if (status == OK)
        status = utf8_of(number, port, port_size);
    const char *default_port = https ? "443" : "80";
    if (status == OK && *port_size == (Py_ssize_t)strlen(default_port)
            && memcmp(*port, default_port, (size_t)*port_size) == 0)
        *port_size = 0;
    return status;
}

/* The middleware's _uri (scheme://host/path?query), for a path and query that need no
   quoting. `scheme`: request.scheme, or None to read wsgi.url_scheme. */
static int pack_uri(Buffer *buffer, PyObject *meta, PyObject *path, PyObject *scheme,
                    int forwarded_host)
{
    if (scheme == Py_None && (scheme = meta_item(meta, key_wsgi_url_scheme)) == NULL)
        return PyErr_Occurred() ? ERROR : DECLINE;
    const char *scheme_text, *host, *port = NULL;
    Py_ssize_t scheme_size, host_size, port_size;
    int status = utf8_of(scheme, &scheme_text, &scheme_size);
    if (status != OK)
        return status;
    if (scheme_size == 0)
        return DECLINE; /* request.scheme, in Python */
    int https = scheme_size == 5 && memcmp(scheme_text, "https", 5) == 0;
    status = host_of(meta, forwarded_host, https, &host, &host_size,
                     &port, &port_size);
    if (status != OK)
        return status;
    PyObject *query = meta_item(meta, key_query_string);
    if (query == NULL && PyErr_Occurred())
        return ERROR;
    if (query == Py_None || (query != NULL && PyUnicode_CheckExact(query)
                             && PyUnicode_GET_LENGTH(query) == 0))
        query = NULL;
    if (!PyUnicode_CheckExact(path) || !is_plain(path, plain_path)
            || (query != NULL && (!PyUnicode_CheckExact(query) || !is_plain(query, plain_query))))
        return DECLINE; /* request.get_full_path(), in Python */
    Py_ssize_t path_size = PyUnicode_GET_LENGTH(path);
    Py_ssize_t query_size = query ? PyUnicode_GET_LENGTH(query) : 0;
    status = put_header(buffer, scheme_size + 3 + host_size + (port_size ? 1 + port_size : 0)
                        + path_size + (query ? 1 + query_size : 0), 0xa0, 32, 0xd9, 0xda, 0xdb);
    if (status == OK)
        status = buffer_write(buffer, scheme_text, scheme_size);
    if (status == OK)
        status = buffer_write(buffer, "://", 3);
    if (status == OK)
        status = buffer_write(buffer, host, host_size);
    if (status == OK && port_size)
        status = put_byte(buffer, ':');
    if (status == OK && port_size)
        status = buffer_write(buffer, port, port_size);
    if (status == OK)
        status = buffer_write(buffer, (const char *)PyUnicode_1BYTE_DATA(path), path_size);
    if (status == OK && query != NULL)
        status = put_byte(buffer, '?');
    if (status == OK && query != NULL)
        status = buffer_write(buffer, (const char *)PyUnicode_1BYTE_DATA(query), query_size);
    return status;
}

/* 1 when `key` starts with "HTTP_", 0 when it does not, -1 when it is not a str. */
static int is_header_key(PyObject *key)
{
    if (!PyUnicode_CheckExact(key))
        return -1;
    if (PyUnicode_GET_LENGTH(key) < 5)
        return 0;
    int kind = PyUnicode_KIND(key);
    const void *data = PyUnicode_DATA(key);
    if (kind == PyUnicode_1BYTE_KIND)
        return memcmp(data, "HTTP_", 5) == 0;
    static const char prefix[] = "HTTP_";
    for (int index = 0; index < 5; index++)
        if (PyUnicode_READ(kind, data, index) != (Py_UCS4)prefix[index])
            return 0;
    return 1;
}

#define MAX_REQUEST_HEADERS 256 /* more go the Python way */

/* The middleware's _meta_headers: the META keys starting with "HTTP_" in META's order, then
   CONTENT_TYPE and CONTENT_LENGTH when present, with their values (borrowed). DECLINE when a
   key is not an exact str: only then are META's lookups free of Python code (a str
   subclass's __eq__ could change META while borrowed values are held), so this runs before
   any other lookup in META. */
typedef struct {
    Py_ssize_t count;
    PyObject *names[MAX_REQUEST_HEADERS + 2];
    PyObject *values[MAX_REQUEST_HEADERS + 2];
} RequestHeaders;

static int request_headers_of(PyObject *meta, RequestHeaders *headers)
{
    Py_ssize_t position = 0;
    PyObject *key, *value;
    headers->count = 0;
    while (PyDict_Next(meta, &position, &key, &value)) {
        int header = is_header_key(key);
        if (header < 0 || (header && headers->count == MAX_REQUEST_HEADERS))
            return DECLINE;
        if (header) {
            headers->names[headers->count] = key;
            headers->values[headers->count++] = value;
        }
    }
    PyObject *content[2] = {key_content_type, key_content_length};
    for (int index = 0; index < 2; index++) {
        if ((value = meta_item(meta, content[index])) != NULL) {
            headers->names[headers->count] = content[index];
            headers->values[headers->count++] = value;
        } else if (PyErr_Occurred()) {
            return ERROR;
        }
    }
    return OK;
}

/* The request headers as [names, values]. */
static int pack_request_headers(Buffer *buffer, const RequestHeaders *headers)
{
    int status = put_byte(buffer, 0x92);
    if (status == OK)
        status = put_header(buffer, headers->count, 0x90, 16, 0, 0xdc, 0xdd);
    for (Py_ssize_t index = 0; index < headers->count && status == OK; index++)
        status = pack_str(buffer, headers->names[index]);
    if (status == OK)
        status = put_header(buffer, headers->count, 0x90, 16, 0, 0xdc, 0xdd);
    for (Py_ssize_t index = 0; index < headers->count && status == OK; index++)
        status = pack(buffer, headers->values[index], 3);
    return status;
}

/* The middleware's _response_headers: the (name, value) pairs of Django's header store. */
static int pack_response_headers(Buffer *buffer, PyObject *store)
{
    if (!PyDict_CheckExact(store))
        return DECLINE;
    int status = put_header(buffer, PyDict_GET_SIZE(store), 0x90, 16, 0, 0xdc, 0xdd);
    Py_ssize_t position = 0;
    PyObject *key, *pair;
    while (status == OK && PyDict_Next(store, &position, &key, &pair))
        status = pack(buffer, pair, 2);
    return status;
}

static PyObject *pack_incoming(PyObject *module, PyObject *const *arguments, Py_ssize_t count)
{
    (void)module;
    if (count != INCOMING_ARGUMENTS) {
        PyErr_Format(PyExc_TypeError, "pack_incoming takes %d arguments (%zd given)",
                     INCOMING_ARGUMENTS, count);
        return NULL;
    }
    /* The arguments, in this order; the record's other fields come from `meta`. */
    PyObject *meta = arguments[0], *path = arguments[1], *scheme = arguments[2];
    int forwarded_host = PyObject_IsTrue(arguments[3]);
    PyObject *const *times_and_verb = arguments + 4; /* request and response time, verb */
    PyObject *request_body = arguments[7], *status_code = arguments[8], *store = arguments[9];
    PyObject *const *tail = arguments + 10; /* response body ... settings tag: 9 fields */
    if (forwarded_host < 0)
        return NULL;
    if (!PyDict_CheckExact(meta))
        Py_RETURN_NONE;
    RequestHeaders headers; /* first: it checks that META's lookups run no Python code */
    int checked = request_headers_of(meta, &headers);
    if (checked != OK)
        return checked == DECLINE ? Py_NewRef(Py_None) : NULL;
    PyObject *remote_addr = meta_item(meta, key_remote_addr);
    if (remote_addr == NULL && PyErr_Occurred())
        return NULL;

    Buffer buffer;
    buffer_init(&buffer);
    buffer.data[buffer.length++] = CALL_KIND;
    int status = put_header(&buffer, FIELD_COUNT, 0x90, 16, 0, 0xdc, 0xdd);
    if (status == OK)
        status = pack_str(&buffer, direction_incoming);
    for (int index = 0; index < 3 && status == OK; index++)
        status = pack(&buffer, times_and_verb[index], 1);
    if (status == OK)
        status = pack_uri(&buffer, meta, path, scheme, forwarded_host);
    if (status == OK)
        status = pack_request_headers(&buffer, &headers);
    if (status == OK)
        status = pack(&buffer, remote_addr ? remote_addr : Py_None, 1);
    if (status == OK)
        status = pack(&buffer, request_body, 1);
    if (status == OK)
        status = pack(&buffer, status_code, 1);
    if (status == OK)
        status = pack_response_headers(&buffer, store);
    for (int index = 0; index < 9 && status == OK; index++)
        status = pack(&buffer, tail[index], 1);
    return packed(&buffer, status);
}

/* -- transaction ids ----------------------------------------------------------------------- */

/* xoshiro256** (Blackman and Vigna, public domain), seeded from getrandom() on first use in
   each process: a forked child reseeds (pthread_atfork), so two workers never share ids. */
static uint64_t generator[4];
static int generator_seeded;

static uint64_t rotate_left(uint64_t value, int bits)
{
    return (value << bits) | (value >> (64 - bits));
}

static uint64_t next_random(void)
{
    uint64_t result = rotate_left(generator[1] * 5, 7) * 9;
    uint64_t shifted = generator[1] << 17;
    generator[2] ^= generator[0];
    generator[3] ^= generator[1];
    generator[1] ^= generator[2];
    generator[0] ^= generator[3];
    generator[2] ^= shifted;
    generator[3] = rotate_left(generator[3], 45);
    return result;
}

static void forget_seed(void)
{
    generator_seeded = 0;
}

static int seed_generator(void)
{
    char *out = (char *)generator;
    size_t wanted = sizeof generator;
    while (wanted > 0) {
        ssize_t got = getrandom(out, wanted, 0);
        if (got <= 0)
            return 0;
        out += got;
        wanted -= (size_t)got;
    }
    generator_seeded = (generator[0] | generator[1] | generator[2] | generator[3]) != 0;
    return generator_seeded;
}

static PyObject *transaction_id(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    if (!generator_seeded && !seed_generator())
        Py_RETURN_NONE; /* no kernel randomness: the Python generator is used */
    static const char digits[] = "0123456789abcdef";
    uint64_t halves[2] = {next_random(), next_random()};
    char hex[32];
    for (int index = 0; index < 32; index++)
        hex[index] = digits[(halves[index / 16] >> (4 * (index % 16))) & 15];
    PyObject *text = PyUnicode_New(36, 127);
    if (text == NULL)
        return NULL;
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(text);
    memcpy(out, hex, 8); /* 8-4-4-4-12 */
    out[8] = '-';
    memcpy(out + 9, hex + 8, 4);
    out[13] = '-';
    memcpy(out + 14, hex + 12, 4);
    out[18] = '-';
    memcpy(out + 19, hex + 16, 4);
    out[23] = '-';
    memcpy(out + 24, hex + 20, 12);
    out[14] = '4'; /* version 4 */
    out[19] = 'a'; /* variant 10xx */
    return text;
}

static PyMethodDef methods[] = {
    {"pack_call", pack_call, METH_O,
     "pack_call(fields) -> the record's bytes (record.encode_call), or None: Python packs it."},
    {"pack_incoming", (PyCFunction)(void (*)(void))pack_incoming, METH_FASTCALL,
     "pack_incoming(meta, path, scheme, forwarded_host, request_time, response_time, verb,\n"
     "request_body, status, header_store, response_body, transaction_id, user_id, company_id,\n"
     "session_token, metadata, weight, blocked_by, settings_tag) -> the record's bytes of an\n"
     "incoming call, or None: the middleware gathers the fields in Python.\n\n"
     "`scheme` is None to read META's wsgi.url_scheme; `header_store` is the response's\n"
     "HttpHeaders._store. Declined (None): META or the store not an exact dict, a META key not\n"
     "a str, no Host header and no SERVER_NAME and SERVER_PORT, a path or query that Django\n"
     "would quote, a scheme, host, port, path or query not an exact str, an empty scheme, and\n"
     "any value pack_call declines."},
    {"transaction_id", transaction_id, METH_NOARGS,
     "transaction_id() -> a random UUID4 string (version nibble 4, variant nibble a), or None\n"
     "when the kernel gives no randomness."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "moesif_fast._recordpack",
    .m_doc = "The worker's record of a captured call, packed in C (see record.py).",
    .m_size = -1,
    .m_methods = methods,
};

static int intern_keys(void)
{
    struct {
        PyObject **key;
        const char *text;
    } keys[] = {
        {&key_wsgi_url_scheme, "wsgi.url_scheme"},
        {&key_http_host, "HTTP_HOST"},
        {&key_http_x_forwarded_host, "HTTP_X_FORWARDED_HOST"},
        {&key_server_name, "SERVER_NAME"},
        {&key_server_port, "SERVER_PORT"},
        {&key_query_string, "QUERY_STRING"},
        {&key_remote_addr, "REMOTE_ADDR"},
        {&key_content_type, "CONTENT_TYPE"},
        {&key_content_length, "CONTENT_LENGTH"},
        {&direction_incoming, "Incoming"},
    };
    for (size_t index = 0; index < sizeof keys / sizeof keys[0]; index++)
        if ((*keys[index].key = PyUnicode_InternFromString(keys[index].text)) == NULL)
            return -1;
    return 0;
}

PyMODINIT_FUNC PyInit__recordpack(void)
{
    for (const char *c = PLAIN_PATH; *c; c++)
        plain_path[(unsigned char)*c] = 1;
    for (const char *c = PLAIN_QUERY; *c; c++)
        plain_query[(unsigned char)*c] = 1;
    if (intern_keys() < 0)
        return NULL;
    if (pthread_atfork(NULL, NULL, forget_seed) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
    return PyModule_Create(&module);
}
