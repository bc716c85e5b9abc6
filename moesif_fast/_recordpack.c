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

`Capturer(...).capture(...)` is the middleware's `_gather`, `pack_incoming` and the append in
one call, for options without callbacks: it appends the record, or answers the gathered values
for the Python path to pack (see its docstring and docs/compiled.md).

`transaction_id()` returns a random version-4 UUID string in the middleware's format.

Only exact built-in types are read, so no Python code runs while a value is packed and no
container can change under the packer (the Capturer reads the request and response through
Python's attribute lookups before it packs). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <pthread.h>
#include <sys/random.h>
#include <time.h>

#include "_buffer.h"
#include "ringbuffer/_lane.h"

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

/* pack_incoming's record written to `buffer` (empty): OK, DECLINE or ERROR. */
static int pack_incoming_into(Buffer *buffer, PyObject *const *arguments)
{
    /* The arguments, in this order; the record's other fields come from `meta`. */
    PyObject *meta = arguments[0], *path = arguments[1], *scheme = arguments[2];
    int forwarded_host = PyObject_IsTrue(arguments[3]);
    PyObject *const *times_and_verb = arguments + 4; /* request and response time, verb */
    PyObject *request_body = arguments[7], *status_code = arguments[8], *store = arguments[9];
    PyObject *const *tail = arguments + 10; /* response body ... settings tag: 9 fields */
    if (forwarded_host < 0)
        return ERROR;
    if (!PyDict_CheckExact(meta))
        return DECLINE;
    RequestHeaders headers; /* first: it checks that META's lookups run no Python code */
    int status = request_headers_of(meta, &headers);
    if (status != OK)
        return status;
    PyObject *remote_addr = meta_item(meta, key_remote_addr);
    if (remote_addr == NULL && PyErr_Occurred())
        return ERROR;

    buffer->data[buffer->length++] = CALL_KIND;
    status = put_header(buffer, FIELD_COUNT, 0x90, 16, 0, 0xdc, 0xdd);
    if (status == OK)
        status = pack_str(buffer, direction_incoming);
    for (int index = 0; index < 3 && status == OK; index++)
        status = pack(buffer, times_and_verb[index], 1);
    if (status == OK)
        status = pack_uri(buffer, meta, path, scheme, forwarded_host);
    if (status == OK)
        status = pack_request_headers(buffer, &headers);
    if (status == OK)
        status = pack(buffer, remote_addr ? remote_addr : Py_None, 1);
    if (status == OK)
        status = pack(buffer, request_body, 1);
    if (status == OK)
        status = pack(buffer, status_code, 1);
    if (status == OK)
        status = pack_response_headers(buffer, store);
    for (int index = 0; index < 9 && status == OK; index++)
        status = pack(buffer, tail[index], 1);
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
    Buffer buffer;
    buffer_init(&buffer);
    return packed(&buffer, pack_incoming_into(&buffer, arguments));
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


/* -- the capture after the view ----------------------------------------------------------- */

/* Interned at import: the attributes read, and the names and values written. */
static PyObject *name_meta, *name_headers, *name_store, *name_method, *name_path, *name_scheme,
    *name_status_code, *name_content, *name_session, *name_session_key, *name_get,
    *key_transaction_id, *transaction_header, *verb_head, *empty_text, *name_dict, *name_user,
    *name_setupfunc, *name_wrapped, *name_cached_user, *name_code, *name_closure,
    *name_cell_contents, *name_get_user, *name_get_user_session_key, *name_get_user_model,
    *name_session_key_setting, *name_session_cache, *name_accessed, *name_container;

#define MAX_CLIENT_TRANSACTION_ID 200 /* the middleware's MAX_CLIENT_TRANSACTION_ID */
#define GATHERED_FIELDS 8 /* the middleware's Gathered */

/* The middleware's _gather and the packing of _record in one call, for the options it is
   created with (no callbacks, no LOCAL_DEBUG): the fields hold those options and the
   middleware's values and functions they read. */
typedef struct {
    PyObject_HEAD
    PyObject *settings_tag;
    int log_body;
    Py_ssize_t max_body_size;
    int request_scheme; /* read request.scheme (SECURE_PROXY_SSL_HEADER), not META's */
    int forwarded_host;
    int transaction_ids; /* not DISABLE_TRANSACTION_ID */
    PyObject *response_type; /* django.http.HttpResponse */
    PyObject *content_property; /* its `content` */
    PyObject *new_transaction_id; /* the Python ids, where the kernel gives no randomness */
    PyObject *authenticated_user_id; /* the middleware's _authenticated_user_id(user) */
    PyObject *lazy_type, *lazy_empty; /* SimpleLazyObject, and its unevaluated marker */
    PyObject *session_auth; /* the middleware's _known_session_auth() */
    PyObject *session_kinds; /* its _plain_session_types: {session class: plain} */
    PyObject *session_check; /* its _session_user_is_anonymous(request): for a new kind */
    PyObject *known; /* what session_auth() answered (NULL: not asked yet) */
} Capturer;

/* time.time_ns(). */
static PyObject *time_ns_now(void)
{
    struct timespec now;
    if (clock_gettime(CLOCK_REALTIME, &now) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLongLong((long long)now.tv_sec * 1000000000LL + now.tv_nsec);
}

/* Like getattr(object, name, None), but *value stays NULL when the attribute is absent:
   1 (found), 0 (absent) or -1 (an exception is set). */
static int lookup_attribute(PyObject *object, PyObject *name, PyObject **value)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyObject_GetOptionalAttr(object, name, value);
#else
    return _PyObject_LookupAttr(object, name, value);
#endif
}

/* getattr(object, name, None), as a new reference (NULL with an exception set). */
static PyObject *attribute_or_none(PyObject *object, PyObject *name)
{
    PyObject *value;
    if (lookup_attribute(object, name, &value) == 0)
        value = Py_NewRef(Py_None);
    return value;
}

/* mapping.get(key), as a new reference. */
static PyObject *mapping_get(PyObject *mapping, PyObject *key)
{
    if (!PyDict_CheckExact(mapping))
        return PyObject_CallMethodOneArg(mapping, name_get, key);
    PyObject *value = PyDict_GetItemWithError(mapping, key);
    if (value == NULL && PyErr_Occurred())
        return NULL;
    return Py_NewRef(value ? value : Py_None);
}


/* `object.name is expected`: 1, 0 or -1. */
static int attribute_is(PyObject *object, PyObject *name, PyObject *expected)
{
    PyObject *value = PyObject_GetAttr(object, name);
    if (value == NULL)
        return -1;
    Py_DECREF(value);
    return value == expected;
}

/* _SessionAuth's fields, by position (middleware.py). */
enum { KNOWN_MIDDLEWARE, KNOWN_AUTH, KNOWN_LAZY_USER_CODE, KNOWN_MIDDLEWARE_GET_USER,
       KNOWN_GET_USER, KNOWN_GET_USER_SESSION_KEY, KNOWN_GET_USER_MODEL, KNOWN_SESSION_KEY,
       KNOWN_SESSION_BASE, KNOWN_FIELDS };

/* The checks of the middleware's _session_user_is_anonymous from its lazy user on, given the
   request's __dict__ and that lazy user: 1, 0, or -1 with an exception set (any Exception
   there answers 0 in Python, as the caller does). */
static int lazy_user_is_anonymous(Capturer *self, PyObject *request, PyObject *instance,
                                  PyObject *user)
{
    PyObject *state = NULL, *setup = NULL, *wrapped = NULL, *cached = NULL, *code = NULL,
        *closure = NULL, *cell = NULL, *contents = NULL, *session = NULL, *session_state = NULL,
        *data = NULL, *key = NULL;
    int result = -1;
    if ((state = PyObject_GenericGetAttr(user, name_dict)) == NULL
            || (setup = mapping_get(state, name_setupfunc)) == NULL
            || (wrapped = mapping_get(state, name_wrapped)) == NULL)
        goto done;
    result = 0;
    if (wrapped != self->lazy_empty)
        goto done; /* evaluated already */
    int found = lookup_attribute(request, name_cached_user, &cached);
    if (found != 0) {
        result = found < 0 ? -1 : 0;
        goto done;
    }
    if ((found = lookup_attribute(setup, name_code, &code)) <= 0 || code == Py_None) {
        result = found < 0 ? -1 : 0;
        goto done; /* not Django's lazy user */
    }
    if (self->known == NULL) {
        self->known = PyObject_CallNoArgs(self->session_auth);
        if (self->known == NULL) {
            result = -1;
            goto done;
        }
    }
    PyObject *known = self->known;
    if (!PyTuple_Check(known) || PyTuple_GET_SIZE(known) != KNOWN_FIELDS
            || code != PyTuple_GET_ITEM(known, KNOWN_LAZY_USER_CODE))
        goto done; /* never taken in this process, or another function's code */
    result = -1;
    if ((closure = PyObject_GetAttr(setup, name_closure)) == NULL)
        goto done;
    result = 0;
    if (closure == Py_None)
        goto done;
    result = -1;
    if ((cell = PySequence_GetItem(closure, 0)) == NULL
            || (contents = PyObject_GetAttr(cell, name_cell_contents)) == NULL)
        goto done;
    result = 0;
    if (contents != request)
        goto done;
    PyObject *middleware = PyTuple_GET_ITEM(known, KNOWN_MIDDLEWARE);
    PyObject *auth = PyTuple_GET_ITEM(known, KNOWN_AUTH);
    struct {
        PyObject *module, *name;
        int field;
    } functions[] = {
        {middleware, name_get_user, KNOWN_MIDDLEWARE_GET_USER},
        {auth, name_get_user, KNOWN_GET_USER},
        {auth, name_get_user_session_key, KNOWN_GET_USER_SESSION_KEY},
        {auth, name_get_user_model, KNOWN_GET_USER_MODEL},
    };
    for (size_t index = 0; index < sizeof functions / sizeof functions[0]; index++) {
        result = attribute_is(functions[index].module, functions[index].name,
                              PyTuple_GET_ITEM(known, functions[index].field));
        if (result <= 0)
            goto done; /* replaced since (a mock, a wrapper) */
    }
    PyObject *session_key = PyTuple_GET_ITEM(known, KNOWN_SESSION_KEY);
    if ((key = PyObject_GetAttr(auth, name_session_key_setting)) == NULL
            || (result = PyObject_RichCompareBool(session_key, key, Py_NE)) != 0) {
        result = result > 0 ? 0 : -1;
        goto done;
    }
    Py_CLEAR(key);
    if ((session = mapping_get(instance, name_session)) == NULL) {
        result = -1;
        goto done;
    }
    PyObject *plain = PyDict_GetItemWithError(self->session_kinds, (PyObject *)Py_TYPE(session));
    if (plain == NULL) {
        if (PyErr_Occurred()) {
            result = -1;
            goto done;
        }
        /* A session class not met yet: the Python check decides, and remembers the class. */
        PyObject *answer = PyObject_CallOneArg(self->session_check, request);
        result = answer == NULL ? -1 : PyObject_IsTrue(answer);
        Py_XDECREF(answer);
        goto done;
    }
    if ((result = PyObject_IsTrue(plain)) <= 0)
        goto done;
    result = -1;
    if ((session_state = PyObject_GetAttr(session, name_dict)) == NULL
            || (data = mapping_get(session_state, name_session_cache)) == NULL)
        goto done;
    if (data == Py_None) {
        if ((key = PyObject_GetAttr(session, name_session_key)) == NULL)
            goto done;
        result = 0;
        if (key != Py_None)
            goto done; /* the session would be loaded (a query): it may hold a user */
    } else {
        result = 0;
        if (!PyDict_CheckExact(data))
            goto done;
        int holds_user = PyDict_Contains(data, session_key);
        if (holds_user != 0) {
            result = holds_user < 0 ? -1 : 0;
            goto done;
        }
    }
    /* SessionBase._get_session's one lasting effect here */
    result = PyObject_SetAttr(session, name_accessed, Py_True) < 0 ? -1 : 1;
done:
    Py_XDECREF(state);
    Py_XDECREF(setup);
    Py_XDECREF(wrapped);
    Py_XDECREF(cached);
    Py_XDECREF(code);
    Py_XDECREF(closure);
    Py_XDECREF(cell);
    Py_XDECREF(contents);
    Py_XDECREF(session);
    Py_XDECREF(session_state);
    Py_XDECREF(data);
    Py_XDECREF(key);
    return result;
}

/* An exception that Python's `except Exception` catches is cleared (0); any other is kept
   (-1). */
static int clear_exception(void)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyErr_Clear();
    return 0;
}

/* The middleware's _user_id for options without IDENTIFY_USER: None when the session's
   user is certainly anonymous (_session_user_is_anonymous), else _authenticated_user_id of
   `user` or request.user. */
static PyObject *user_id_of(Capturer *self, PyObject *request, PyObject *user)
{
    PyObject *found = NULL;
    if (user == Py_None) {
        PyObject *instance = PyObject_GetAttr(request, name_dict);
        PyObject *lazy = instance == NULL ? NULL : mapping_get(instance, name_user);
        if (lazy == NULL) { /* request.__dict__ failed: _user_id's `except` answers None */
            Py_XDECREF(instance);
            return clear_exception() < 0 ? NULL : Py_NewRef(Py_None);
        }
        int anonymous = 0;
        if (Py_TYPE(lazy) == (PyTypeObject *)self->lazy_type) {
            anonymous = lazy_user_is_anonymous(self, request, instance, lazy);
            if (anonymous < 0) /* the Python check's own `except`: not certainly anonymous */
                anonymous = clear_exception();
        }
        Py_DECREF(instance);
        Py_DECREF(lazy);
        if (anonymous != 0)
            return anonymous < 0 ? NULL : Py_NewRef(Py_None);
    } else {
        int truth = PyObject_IsTrue(user);
        if (truth < 0)
            return clear_exception() < 0 ? NULL : Py_NewRef(Py_None);
        if (truth)
            found = Py_NewRef(user);
    }
    if (found == NULL && lookup_attribute(request, name_user, &found) < 0)
        return clear_exception() < 0 ? NULL : Py_NewRef(Py_None);
    if (found == NULL || found == Py_None)
        return found == NULL ? Py_NewRef(Py_None) : found;
    PyObject *id = PyObject_CallOneArg(self->authenticated_user_id, found);
    Py_DECREF(found);
    return id;
}

/* The transaction id, set on the response: the client's when it sent a short enough one, else
   a fresh one written straight into Django's header store (`store`: None when the response
   has none). */
static PyObject *capture_transaction_id(Capturer *self, PyObject *response, PyObject *meta,
                                        PyObject *store)
{
    PyObject *id = mapping_get(meta, key_transaction_id);
    if (id == NULL)
        return NULL;
    int sent = PyObject_IsTrue(id);
    if (sent > 0) {
        Py_ssize_t length = PyObject_Size(id);
        sent = length < 0 ? -1 : length <= MAX_CLIENT_TRANSACTION_ID;
    }
    if (sent != 0) {
        if (sent > 0 && PyObject_SetItem(response, transaction_header, id) == 0)
            return id; /* the client's: Django checks it */
        Py_DECREF(id);
        return NULL;
    }
    Py_DECREF(id);
    id = transaction_id(NULL, NULL);
    if (id == Py_None) {
        Py_DECREF(id);
        id = PyObject_CallNoArgs(self->new_transaction_id);
    }
    if (id == NULL)
        return NULL;
    int status;
    if (PyDict_CheckExact(store)) {
        PyObject *pair = PyTuple_Pack(2, transaction_header, id);
        status = pair == NULL ? -1 : PyDict_SetItem(store, transaction_header, pair);
        Py_XDECREF(pair);
    } else {
        status = PyObject_SetItem(response, transaction_header, id);
    }
    if (status < 0)
        Py_CLEAR(id);
    return id;
}

/* The response body as the record takes it: None, the content, or its size when larger than
   MAX_BODY_SIZE. */
static PyObject *response_body_of(Capturer *self, PyObject *response, PyObject *method)
{
    if (!self->log_body)
        return Py_NewRef(Py_None);
    int wanted = PyObject_IsInstance(response, self->response_type);
    if (wanted > 0)
        wanted = PyObject_RichCompareBool(method, verb_head, Py_NE); /* none on the wire */
    if (wanted <= 0)
        return wanted < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *content = NULL;
    if (_PyType_Lookup(Py_TYPE(response), name_content) == self->content_property) {
        /* HttpResponse's own `content`: b"".join(self._container), which for one piece of
           bytes is that piece */
        PyObject *container;
        if (lookup_attribute(response, name_container, &container) < 0)
            return NULL;
        if (container != NULL && PyList_CheckExact(container) && PyList_GET_SIZE(container) == 1
                && PyBytes_CheckExact(PyList_GET_ITEM(container, 0)))
            content = Py_NewRef(PyList_GET_ITEM(container, 0));
        Py_XDECREF(container);
    }
    if (content == NULL && (content = PyObject_GetAttr(response, name_content)) == NULL)
        return NULL;
    int present = PyObject_IsTrue(content);
    Py_ssize_t size = present > 0 ? PyObject_Size(content) : 0;
    if (present <= 0 || size < 0) {
        Py_DECREF(content);
        return present == 0 ? Py_NewRef(Py_None) : NULL;
    }
    if (size <= self->max_body_size)
        return content;
    Py_DECREF(content);
    return PyLong_FromSsize_t(size);
}

/* request.session.session_key, or None without a session. */
static PyObject *session_token_of(PyObject *request)
{
    PyObject *session = attribute_or_none(request, name_session);
    if (session == NULL || session == Py_None)
        return session;
    PyObject *key = attribute_or_none(session, name_session_key);
    Py_DECREF(session);
    return key;
}

/* The ring's append interface (_lane.h), or NULL when the ring's extension cannot be loaded:
   looked up when the first Capturer is made. */
static LaneAPI *lane_api;

/* `append`(the record in `buffer`), answered as append answers (True: published, False:
   dropped); straight into the lane when `append` is a ring Appender owning one, with no bytes
   object in between. */
static PyObject *append_record(PyObject *append, const Buffer *buffer)
{
    if (lane_api != NULL && Py_IS_TYPE(append, lane_api->appender_type)) {
        int written = lane_api->write(append, buffer->data, buffer->length);
        if (written != LANE_NOT_OWNED)
            return written < 0 ? NULL : PyBool_FromLong(written);
    }
    PyObject *record = PyBytes_FromStringAndSize(buffer->data, buffer->length);
    if (record == NULL)
        return NULL;
    PyObject *answer = PyObject_CallOneArg(append, record);
    Py_DECREF(record);
    return answer;
}

#define CAPTURE_ARGUMENTS 9

/* capture(request, response, request_time, request_body, user, weight, blocked_by,
   max_record, append) */
static PyObject *capture(Capturer *self, PyObject *const *arguments, Py_ssize_t count)
{
    if (count != CAPTURE_ARGUMENTS) {
        PyErr_Format(PyExc_TypeError, "capture takes %d arguments (%zd given)",
                     CAPTURE_ARGUMENTS, count);
        return NULL;
    }
    PyObject *request = arguments[0], *response = arguments[1], *request_time = arguments[2],
        *request_body = arguments[3], *user = arguments[4], *weight = arguments[5],
        *blocked_by = arguments[6], *append = arguments[8];
    Py_ssize_t max_record = PyLong_AsSsize_t(arguments[7]);
    if (max_record == -1 && PyErr_Occurred())
        return NULL;
    PyObject *result = NULL, *response_time = NULL, *meta = NULL, *headers = NULL,
        *store = NULL, *id = NULL, *user_id = NULL, *method = NULL, *response_body = NULL,
        *session_token = NULL, *path = NULL, *scheme = NULL, *status = NULL;
    if ((response_time = time_ns_now()) == NULL
            || (meta = PyObject_GetAttr(request, name_meta)) == NULL
            || (headers = PyObject_GetAttr(response, name_headers)) == NULL
            || (store = attribute_or_none(headers, name_store)) == NULL)
        goto done;
    id = self->transaction_ids ? capture_transaction_id(self, response, meta, store)
                               : Py_NewRef(Py_None);
    if (id == NULL || (user_id = user_id_of(self, request, user)) == NULL
            || (method = PyObject_GetAttr(request, name_method)) == NULL)
        goto done;
    int named = PyObject_IsTrue(method);
    if (named <= 0) {
        Py_SETREF(method, Py_NewRef(empty_text));
        if (named < 0)
            goto done;
    }
    if ((response_body = response_body_of(self, response, method)) == NULL
            || (session_token = session_token_of(request)) == NULL
            || (path = PyObject_GetAttr(request, name_path)) == NULL
            || (scheme = self->request_scheme ? PyObject_GetAttr(request, name_scheme)
                                              : Py_NewRef(Py_None)) == NULL
            || (status = PyObject_GetAttr(response, name_status_code)) == NULL)
        goto done;
    PyObject *fields[INCOMING_ARGUMENTS] = {
        meta, path, scheme, self->forwarded_host ? Py_True : Py_False, request_time,
        response_time, method, request_body, status, store, response_body, id, user_id,
        Py_None, session_token, Py_None, weight, blocked_by, self->settings_tag};
    Buffer buffer;
    buffer_init(&buffer);
    int packing = pack_incoming_into(&buffer, fields);
    if (packing == OK && buffer.length <= max_record)
        result = append_record(append, &buffer);
    else if (packing != ERROR) /* left to the middleware's _record, with what was gathered */
        result = PyTuple_Pack(GATHERED_FIELDS, response_time, id, user_id, Py_None,
                              response_body, session_token, Py_None, weight);
    buffer_free(&buffer);
done:
    Py_XDECREF(response_time);
    Py_XDECREF(meta);
    Py_XDECREF(headers);
    Py_XDECREF(store);
    Py_XDECREF(id);
    Py_XDECREF(user_id);
    Py_XDECREF(method);
    Py_XDECREF(response_body);
    Py_XDECREF(session_token);
    Py_XDECREF(path);
    Py_XDECREF(scheme);
    Py_XDECREF(status);
    return result;
}

static PyObject *capturer_new(PyTypeObject *type, PyObject *arguments, PyObject *keywords)
{
    static char *names[] = {"settings_tag", "log_body", "max_body_size", "request_scheme",
                            "forwarded_host", "transaction_ids", "response_type",
                            "new_transaction_id", "authenticated_user_id", "lazy_type",
                            "lazy_empty", "session_auth", "session_kinds", "session_check",
                            NULL};
    PyObject *settings_tag, *max_body_size, *response_type, *new_transaction_id,
        *authenticated_user_id, *lazy_type, *lazy_empty, *session_auth, *session_kinds,
        *session_check;
    int log_body, request_scheme, forwarded_host, transaction_ids;
    if (!PyArg_ParseTupleAndKeywords(arguments, keywords, "OpO!pppO!OOO!OOO!O:Capturer", names,
                                     &settings_tag, &log_body, &PyLong_Type, &max_body_size,
                                     &request_scheme, &forwarded_host, &transaction_ids,
                                     &PyType_Type, &response_type, &new_transaction_id,
                                     &authenticated_user_id, &PyType_Type, &lazy_type,
                                     &lazy_empty, &session_auth, &PyDict_Type, &session_kinds,
                                     &session_check))
        return NULL;
    Py_ssize_t max_body = PyLong_AsSsize_t(max_body_size);
    if (max_body == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear();
        max_body = PY_SSIZE_T_MAX; /* larger than any body */
    }
    if (lane_api == NULL && (lane_api = PyCapsule_Import(LANE_API_CAPSULE, 0)) == NULL)
        PyErr_Clear(); /* no ring extension: every record is appended through the call */
    Capturer *self = (Capturer *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->settings_tag = Py_NewRef(settings_tag);
    self->log_body = log_body;
    self->max_body_size = max_body;
    self->request_scheme = request_scheme;
    self->forwarded_host = forwarded_host;
    self->transaction_ids = transaction_ids;
    self->response_type = Py_NewRef(response_type);
    self->content_property = Py_XNewRef(_PyType_Lookup((PyTypeObject *)response_type,
                                                       name_content));
    self->new_transaction_id = Py_NewRef(new_transaction_id);
    self->authenticated_user_id = Py_NewRef(authenticated_user_id);
    self->lazy_type = Py_NewRef(lazy_type);
    self->lazy_empty = Py_NewRef(lazy_empty);
    self->session_auth = Py_NewRef(session_auth);
    self->session_kinds = Py_NewRef(session_kinds);
    self->session_check = Py_NewRef(session_check);
    self->known = NULL;
    return (PyObject *)self;
}

static int capturer_traverse(Capturer *self, visitproc visit, void *arg) /* Py_VISIT's names */
{
    Py_VISIT(self->settings_tag);
    Py_VISIT(self->response_type);
    Py_VISIT(self->content_property);
    Py_VISIT(self->new_transaction_id);
    Py_VISIT(self->authenticated_user_id);
    Py_VISIT(self->lazy_type);
    Py_VISIT(self->lazy_empty);
    Py_VISIT(self->session_auth);
    Py_VISIT(self->session_kinds);
    Py_VISIT(self->session_check);
    Py_VISIT(self->known);
    return 0;
}

static int capturer_clear(Capturer *self)
{
    Py_CLEAR(self->settings_tag);
    Py_CLEAR(self->response_type);
    Py_CLEAR(self->content_property);
    Py_CLEAR(self->new_transaction_id);
    Py_CLEAR(self->authenticated_user_id);
    Py_CLEAR(self->lazy_type);
    Py_CLEAR(self->lazy_empty);
    Py_CLEAR(self->session_auth);
    Py_CLEAR(self->session_kinds);
    Py_CLEAR(self->session_check);
    Py_CLEAR(self->known);
    return 0;
}

static void capturer_dealloc(Capturer *self)
{
    PyObject_GC_UnTrack(self);
    capturer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef capturer_methods[] = {
    {"capture", (PyCFunction)(void (*)(void))capture, METH_FASTCALL,
     "capture(request, response, request_time, request_body, user, weight, blocked_by,\n"
     "max_record, append) -> append(record)'s answer (True: published, False: dropped), or\n"
     "the Gathered tuple for the middleware's _record when the record is larger than\n"
     "max_record or pack_incoming declines it. A ring Appender owning a lane gets the record\n"
     "from the packer's buffer, with no bytes object in between (see _lane.h).\n\n"
     "What MoesifMiddleware._gather returns for a call kept before the view (so `weight`\n"
     "is given), for options without callbacks, then pack_incoming of it: the transaction id\n"
     "is set on the response as _gather sets it, the user id is _user_id's (the session\n"
     "shortcut in C, then authenticated_user_id), the company id and metadata are None."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CapturerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "moesif_fast._recordpack.Capturer",
    .tp_doc = "Capturer(settings_tag, log_body, max_body_size, request_scheme, forwarded_host,\n"
              "transaction_ids, response_type, new_transaction_id, authenticated_user_id,\n"
              "lazy_type, lazy_empty, session_auth, session_kinds, session_check): the\n"
              "middleware's _gather and record packing for options without callbacks (see\n"
              "capture); the arguments are the options and the middleware module's values and\n"
              "functions they read.",
    .tp_basicsize = sizeof(Capturer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = capturer_new,
    .tp_traverse = (traverseproc)capturer_traverse,
    .tp_clear = (inquiry)capturer_clear,
    .tp_dealloc = (destructor)capturer_dealloc,
    .tp_methods = capturer_methods,
};

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
        {&name_meta, "META"},
        {&name_headers, "headers"},
        {&name_store, "_store"},
        {&name_method, "method"},
        {&name_path, "path"},
        {&name_scheme, "scheme"},
        {&name_status_code, "status_code"},
        {&name_content, "content"},
        {&name_session, "session"},
        {&name_session_key, "session_key"},
        {&name_get, "get"},
        {&key_transaction_id, "HTTP_X_MOESIF_TRANSACTION_ID"},
        {&transaction_header, "x-moesif-transaction-id"},
        {&verb_head, "HEAD"},
        {&empty_text, ""},
        {&name_dict, "__dict__"},
        {&name_user, "user"},
        {&name_setupfunc, "_setupfunc"},
        {&name_wrapped, "_wrapped"},
        {&name_cached_user, "_cached_user"},
        {&name_code, "__code__"},
        {&name_closure, "__closure__"},
        {&name_cell_contents, "cell_contents"},
        {&name_get_user, "get_user"},
        {&name_get_user_session_key, "_get_user_session_key"},
        {&name_get_user_model, "get_user_model"},
        {&name_session_key_setting, "SESSION_KEY"},
        {&name_session_cache, "_session_cache"},
        {&name_accessed, "accessed"},
        {&name_container, "_container"},
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
    if (PyType_Ready(&CapturerType) < 0)
        return NULL;
    PyObject *created = PyModule_Create(&module);
    if (created != NULL && PyModule_AddObjectRef(created, "Capturer",
                                                 (PyObject *)&CapturerType) < 0)
        Py_CLEAR(created);
    return created;
}
