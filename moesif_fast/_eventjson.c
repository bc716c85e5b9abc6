/* moesif_fast._eventjson: a CapturedCall's Moesif event as JSON text, written in C.

`Encoder(...)` holds what one EventBuilder worked out from its options; `Encoder.encode(call)`
returns the bytes `EventBuilder.encode(call)` returns (orjson's compact UTF-8 text, JSON bodies
copied as sent), or None for any call it leaves to the Python path (event.py then runs that
path, the reference): bodies that need gunzip or body masks, JSON bodies it cannot prove orjson
accepts, strings with lone surrogates, integers past 64 bits, floats orjson formats otherwise
than repr, values nested deeper than MAX_DEPTH, types other than None, bool, int, float, str,
dict (str keys), list and tuple, and a call of any unexpected shape. It trusts no length and no
type in the call: every one is checked before use. `Encoder.encode_into` writes the same text
straight into the piece of a batch that event.py's BatchWriter fills, with no bytes object of
its own.

What depends on header text that repeats (header names from META keys, the user id of a token,
the address in a client-IP header) is read from the builder's own memos; on a miss it calls the
builder's method, which computes it and fills the memo, so both paths share one implementation
of those rules. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "_buffer.h"

#define OK 0
#define DECLINE 1 /* left to the Python path: encode returns None */
#define ERROR (-1) /* a Python exception is set */

/* Returns the status of `expression` unless it is OK. */
#define CHECK(expression)             \
    do {                              \
        int status_ = (expression);   \
        if (status_ != OK)            \
            return status_;           \
    } while (0)

#define MEMO_ENTRIES 1024 /* event.py's _CACHE_ENTRIES: the bound of every memo */

/* Nesting this file writes at most; orjson refuses 255 levels, and the Python path handles
   the rest. */
#define MAX_DEPTH 128
#define MAX_COPIED_CONTAINERS 900 /* event.py's _MAX_COPIED_CONTAINERS */
/* A copied JSON body's numbers must be below 10**MAX_FINITE_DIGITS, their exponents at most
   MAX_EXPONENT_DIGITS long: orjson refuses numbers that overflow a double. */
#define MAX_FINITE_DIGITS 300
#define MAX_EXPONENT_DIGITS 4
#define SECOND_TEXT 21 /* the start of a time in the event: "\"YYYY-MM-DDTHH:MM:SS." */

typedef struct {
    PyObject_HEAD
    Py_ssize_t field_count;
    PyObject *api_version;
    PyObject *request_header_masks;  /* frozenset of lowercase names, or None */
    PyObject *response_header_masks;
    int copy_request_body;
    int copy_response_body;
    PyObject *authorization_headers; /* tuple of str */
    PyObject *ip_headers;            /* tuple of str, in order of precedence */
    PyObject *transaction_header;    /* str */
    long long max_body_size;         /* -1: not representable, int bodies are declined */
    PyObject *header_names;          /* the builder's memos (dicts) */
    PyObject *user_ids;
    PyObject *addresses;
    PyObject *request_masked_names;  /* this encoder's memos (dicts): see mask_headers */
    PyObject *response_masked_names;
    PyObject *incoming_header_name;  /* the builder's methods, called on a memo miss */
    PyObject *user_id_from_headers;
    PyObject *client_ip;
    PyObject *new_transaction_id;    /* () -> a fresh transaction id */
    long long formatted_second;      /* see write_time */
    char second_text[SECOND_TEXT];
} Encoder;

#define WRITE_LITERAL(buffer, text) buffer_write((buffer), (text), (Py_ssize_t)(sizeof(text) - 1))

/* --- JSON values, as orjson writes them ---------------------------------------------------- */

/* For each byte: 0 if orjson writes it as it is, else the letter of its escape ('u': \u00XX). */
static const char ESCAPES[256] = {
    'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'b', 't', 'n', 'u', 'f', 'r', 'u', 'u',
    'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u',
    0, 0, '"', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, '\\', 0, 0, 0,
};

static const char HEX_DIGITS[] = "0123456789abcdef";

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/* The 8 bytes at `bytes`, the first in the lowest bits whatever the machine's byte order (so
   that the lowest flag of a mask below is the first byte). */
static uint64_t load8(const unsigned char *bytes)
{
    uint64_t word;
    memcpy(&word, bytes, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    word = __builtin_bswap64(word);
#endif
    return word;
}

/* The usual bit tricks for "some byte is zero / less than n", on all 8 bytes of a word at
   once: each returns the high bit of every byte it flags. A borrow only runs upwards from a
   flagged byte, so the mask is 0 exactly when no byte is flagged, and its lowest flag is
   always right: the first byte to look at (mask_offset). */

/* The bytes orjson escapes: below 0x20, '"' and '\\' (a byte of 0x80 or more is never one). */
static uint64_t escaped_bytes(uint64_t word)
{
    return ((word - ONES * 0x20) | ((word ^ (ONES * '"')) - ONES)
            | ((word ^ (ONES * '\\')) - ONES)) & ~word & HIGHS;
}

/* The bytes a JSON string cannot hold as they are: those escaped_bytes flags, and every byte of
   0x80 or more (the start or the rest of a UTF-8 sequence, to check). */
static uint64_t special_bytes(uint64_t word)
{
    return ((word - ONES * 0x20) | ((word ^ (ONES * '"')) - ONES)
            | ((word ^ (ONES * '\\')) - ONES) | word) & HIGHS;
}

/* The offset in its word of the first byte a non-zero mask flags. */
static Py_ssize_t mask_offset(uint64_t mask)
{
    return __builtin_ctzll(mask) / 8;
}

/* `text` in quotes, escaped, copied as it is scanned: a word at a time, or a byte at a time
   in the last 7 bytes (no call to memcpy for the short strings most are). */
static int write_escaped(Buffer *buffer, const unsigned char *text, Py_ssize_t length)
{
    if (length > PY_SSIZE_T_MAX - 8) { /* so that no size below overflows */
        PyErr_NoMemory();
        return ERROR;
    }
    /* room for the text if nothing is escaped; each escape makes its own room */
    if (buffer_reserve(buffer, length + 2) != OK)
        return ERROR;
    char *out = buffer->data + buffer->length;
    *out++ = '"';
    Py_ssize_t i = 0;
    while (i < length) {
        if (length - i >= 8) {
            /* the 8 bytes fit: the room left is at least length - i + 1 */
            uint64_t escaped = escaped_bytes(load8(text + i));
            Py_ssize_t plain = escaped == 0 ? 8 : mask_offset(escaped);
            memcpy(out, text + i, 8);
            out += plain;
            i += plain;
            if (escaped == 0)
                continue;
        } else if (ESCAPES[text[i]] == 0) {
            *out++ = (char)text[i++];
            continue;
        }
        /* text[i] is escaped: up to 5 more bytes than the 1 reserved for it */
        buffer->length = out - buffer->data;
        if (buffer_reserve(buffer, length - i + 6) != OK)
            return ERROR;
        out = buffer->data + buffer->length;
        char escape = ESCAPES[text[i]];
        *out++ = '\\';
        *out++ = escape;
        if (escape == 'u') {
            *out++ = '0';
            *out++ = '0';
            *out++ = HEX_DIGITS[text[i] >> 4];
            *out++ = HEX_DIGITS[text[i] & 0xf];
        }
        i++;
    }
    *out++ = '"';
    buffer->length = out - buffer->data;
    return OK;
}

/* A str; DECLINE for one with a lone surrogate (orjson refuses it). */
static int write_str(Buffer *buffer, PyObject *text)
{
    if (PyUnicode_IS_COMPACT_ASCII(text)) /* the usual str: its ASCII text is its UTF-8 */
        return write_escaped(buffer, PyUnicode_DATA(text), PyUnicode_GET_LENGTH(text));
    Py_ssize_t length;
    const char *utf8 = PyUnicode_AsUTF8AndSize(text, &length);
    if (utf8 == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            return ERROR;
        PyErr_Clear();
        return DECLINE;
    }
    return write_escaped(buffer, (const unsigned char *)utf8, length);
}

static int write_unsigned(Buffer *buffer, unsigned long long value, int negative)
{
    char digits[24];
    int position = sizeof(digits);
    do {
        digits[--position] = (char)('0' + value % 10);
        value /= 10;
    } while (value != 0);
    if (negative)
        digits[--position] = '-';
    return buffer_write(buffer, digits + position, (Py_ssize_t)sizeof(digits) - position);
}

/* An int orjson writes: from -2**63 to 2**64 - 1; DECLINE past that. */
static int write_int(Buffer *buffer, PyObject *number)
{
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(number, &overflow);
    if (overflow == 0) {
        if (value == -1 && PyErr_Occurred())
            return ERROR;
        return value < 0 ? write_unsigned(buffer, 0ULL - (unsigned long long)value, 1)
                         : write_unsigned(buffer, (unsigned long long)value, 0);
    }
    if (overflow < 0)
        return DECLINE;
    unsigned long long unsigned_value = PyLong_AsUnsignedLongLong(number);
    if (unsigned_value == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return ERROR;
        PyErr_Clear();
        return DECLINE;
    }
    return write_unsigned(buffer, unsigned_value, 0);
}

/* A float: null when not finite (as orjson); repr otherwise, which is orjson's text except
   for negative exponents (repr 1e-07, orjson 1e-7; repr 1e-05, orjson 0.00001): DECLINE. */
static int write_float(Buffer *buffer, PyObject *number)
{
    double value = PyFloat_AS_DOUBLE(number);
    if (!isfinite(value))
        return WRITE_LITERAL(buffer, "null");
    char *text = PyOS_double_to_string(value, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL)
        return ERROR;
    int status = strstr(text, "e-") != NULL ? DECLINE
                                             : buffer_write(buffer, text, (Py_ssize_t)strlen(text));
    PyMem_Free(text);
    return status;
}

static int write_value(Buffer *buffer, PyObject *value, int depth);

static int write_dict(Buffer *buffer, PyObject *dict, int depth)
{
    Py_ssize_t position = 0;
    PyObject *key, *item;
    int first = 1;
    if (buffer_write(buffer, "{", 1) != OK)
        return ERROR;
    while (PyDict_Next(dict, &position, &key, &item)) {
        if (!PyUnicode_CheckExact(key))
            return DECLINE; /* orjson refuses other keys; the Python path makes them text */
        int status;
        if ((!first && buffer_write(buffer, ",", 1) != OK)
                || (status = write_str(buffer, key)) == ERROR
                || (status == OK && buffer_write(buffer, ":", 1) != OK))
            return ERROR;
        if (status != OK)
            return status;
        if ((status = write_value(buffer, item, depth + 1)) != OK)
            return status;
        first = 0;
    }
    return buffer_write(buffer, "}", 1);
}

static int write_array(Buffer *buffer, PyObject *sequence, int depth)
{
    if (buffer_write(buffer, "[", 1) != OK)
        return ERROR;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(sequence); i++) {
        int status;
        if (i != 0 && buffer_write(buffer, ",", 1) != OK)
            return ERROR;
        if ((status = write_value(buffer, PySequence_Fast_GET_ITEM(sequence, i), depth + 1)) != OK)
            return status;
    }
    return buffer_write(buffer, "]", 1);
}

/* Any value of a plain type, as orjson writes it; DECLINE for everything else. No Python code
   runs while it writes (exact types only), so no container can change under it. */
static int write_value(Buffer *buffer, PyObject *value, int depth)
{
    if (depth > MAX_DEPTH)
        return DECLINE;
    if (value == Py_None)
        return WRITE_LITERAL(buffer, "null");
    if (value == Py_True)
        return WRITE_LITERAL(buffer, "true");
    if (value == Py_False)
        return WRITE_LITERAL(buffer, "false");
    if (PyUnicode_CheckExact(value))
        return write_str(buffer, value);
    if (PyLong_CheckExact(value))
        return write_int(buffer, value);
    if (PyFloat_CheckExact(value))
        return write_float(buffer, value);
    if (PyDict_CheckExact(value))
        return write_dict(buffer, value, depth);
    if (PyList_CheckExact(value) || PyTuple_CheckExact(value))
        return write_array(buffer, value, depth);
    return DECLINE;
}

/* --- headers ------------------------------------------------------------------------------- */

/* More header entries than this on one side of a call (the transaction header included):
   DECLINE, which keeps the pairwise search for repeated names below cheap. */
#define MAX_HEADERS 128

/* Headers as the dict event.py builds holds them, without building it: the (name, value)
   entries in the order they are set and, as a name set again keeps its first place and takes
   the last value, for each entry the one holding its name's value. */
typedef struct {
    Py_ssize_t count;
    PyObject *names[MAX_HEADERS];  /* new references, exact str */
    Py_hash_t hashes[MAX_HEADERS];
    PyObject *values[MAX_HEADERS]; /* borrowed: tuples of the call, or the call, hold them */
    /* set by index_headers: the index of the entry holding the value of this entry's name, or
       -1 for an entry whose name an earlier entry has (it is not in the dict's order) */
    Py_ssize_t value_at[MAX_HEADERS];
    /* set by index_headers: bit `hash % 64` of every name's hash, so that most names that are
       not there, and most that are new, are known without comparing with every entry */
    uint64_t hash_bits;
} Headers;

static void headers_clear(Headers *headers)
{
    for (Py_ssize_t i = 0; i < headers->count; i++)
        Py_DECREF(headers->names[i]);
    headers->count = 0;
}

/* Appends an entry: `name` an exact str, `value` kept alive by the caller. */
static int headers_add(Headers *headers, PyObject *name, PyObject *value)
{
    if (headers->count == MAX_HEADERS)
        return DECLINE;
    Py_hash_t hash = PyObject_Hash(name);
    if (hash == -1)
        return ERROR;
    headers->names[headers->count] = Py_NewRef(name);
    headers->hashes[headers->count] = hash;
    headers->values[headers->count] = value;
    headers->count++;
    return OK;
}

/* Whether two exact str are equal (comparing two str raises nothing). */
static int same_name(PyObject *name, Py_hash_t hash, PyObject *other, Py_hash_t other_hash)
{
    return name == other || (hash == other_hash && PyUnicode_Compare(name, other) == 0);
}

static uint64_t hash_bit(Py_hash_t hash)
{
    return (uint64_t)1 << ((uint64_t)hash % 64);
}

/* Sets value_at and hash_bits, once every entry is in. */
static void index_headers(Headers *headers)
{
    headers->hash_bits = 0;
    for (Py_ssize_t i = 0; i < headers->count; i++) {
        headers->value_at[i] = i;
        uint64_t bit = hash_bit(headers->hashes[i]);
        if ((headers->hash_bits & bit) == 0) {
            headers->hash_bits |= bit; /* no earlier name has this hash */
            continue;
        }
        for (Py_ssize_t first = 0; first < i; first++) {
            if (headers->value_at[first] >= 0
                    && same_name(headers->names[first], headers->hashes[first],
                                 headers->names[i], headers->hashes[i])) {
                headers->value_at[first] = i;
                headers->value_at[i] = -1;
                break;
            }
        }
    }
}

/* The value the dict has for `name` (borrowed), or NULL. */
static PyObject *header_value(const Headers *headers, PyObject *name)
{
    Py_hash_t hash = PyObject_Hash(name); /* an exact str: never fails */
    if ((headers->hash_bits & hash_bit(hash)) == 0)
        return NULL;
    for (Py_ssize_t i = 0; i < headers->count; i++)
        if (headers->value_at[i] >= 0
                && same_name(headers->names[i], headers->hashes[i], name, hash))
            return headers->values[headers->value_at[i]];
    return NULL;
}

/* A new dict of the entries, for a Python method of the builder. */
static PyObject *headers_dict(const Headers *headers)
{
    PyObject *dict = PyDict_New();
    if (dict == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < headers->count; i++) {
        if (PyDict_SetItem(dict, headers->names[i], headers->values[i]) < 0) {
            Py_DECREF(dict);
            return NULL;
        }
    }
    return dict;
}

/* The dict as orjson writes it. */
static int write_headers(Buffer *buffer, const Headers *headers)
{
    int first = 1;
    if (buffer_write(buffer, "{", 1) != OK)
        return ERROR;
    for (Py_ssize_t i = 0; i < headers->count; i++) {
        if (headers->value_at[i] < 0)
            continue;
        int status;
        if ((!first && buffer_write(buffer, ",", 1) != OK)
                || (status = write_str(buffer, headers->names[i])) == ERROR
                || (status == OK && buffer_write(buffer, ":", 1) != OK))
            return ERROR;
        if (status != OK)
            return status;
        if ((status = write_value(buffer, headers->values[headers->value_at[i]], 3)) != OK)
            return status;
        first = 0;
    }
    return buffer_write(buffer, "}", 1);
}

/* --- bodies -------------------------------------------------------------------------------- */

static const char BASE64_DIGITS[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* The two base64 digits of every 12-bit value, filled at import: half the lookups per byte. */
static char base64_pairs[4096][2];

static void fill_base64_pairs(void)
{
    for (int value = 0; value < 4096; value++) {
        base64_pairs[value][0] = BASE64_DIGITS[value >> 6];
        base64_pairs[value][1] = BASE64_DIGITS[value & 63];
    }
}

/* As binascii.b2a_base64(data, newline=False), in quotes. */
static int write_base64(Buffer *buffer, const unsigned char *data, Py_ssize_t length)
{
    if (length > (PY_SSIZE_T_MAX - 2) / 4 * 3 - 3) {
        PyErr_NoMemory();
        return ERROR;
    }
    if (buffer_reserve(buffer, (length + 2) / 3 * 4 + 2) != OK)
        return ERROR;
    char *out = buffer->data + buffer->length;
    *out++ = '"';
    Py_ssize_t i = 0;
    for (; i + 2 < length; i += 3) {
        unsigned long triple = ((unsigned long)data[i] << 16) | ((unsigned long)data[i + 1] << 8)
                               | data[i + 2];
        memcpy(out, base64_pairs[triple >> 12], 2);
        memcpy(out + 2, base64_pairs[triple & 4095], 2);
        out += 4;
    }
    if (i < length) {
        unsigned long triple = (unsigned long)data[i] << 16;
        if (i + 1 < length)
            triple |= (unsigned long)data[i + 1] << 8;
        *out++ = BASE64_DIGITS[triple >> 18];
        *out++ = BASE64_DIGITS[(triple >> 12) & 63];
        *out++ = i + 1 < length ? BASE64_DIGITS[(triple >> 6) & 63] : '=';
        *out++ = '=';
    }
    *out++ = '"';
    buffer->length = out - buffer->data;
    return OK;
}

static const char JSON_SPACES[256] = {[' '] = 1, ['\t'] = 1, ['\n'] = 1, ['\r'] = 1};

/* The first index from i on that is not JSON whitespace. */
static Py_ssize_t skip_space(const unsigned char *data, Py_ssize_t length, Py_ssize_t i)
{
    while (i < length && JSON_SPACES[data[i]])
        i++;
    return i;
}

static int hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* The code unit of the \uXXXX escape at data[at] (at the backslash), or -1. */
static long unicode_escape(const unsigned char *data, Py_ssize_t length, Py_ssize_t at)
{
    if (length - at < 6 || data[at] != '\\' || data[at + 1] != 'u')
        return -1;
    long unit = 0;
    for (Py_ssize_t i = at + 2; i < at + 6; i++) {
        int value = hex_value(data[i]);
        if (value < 0)
            return -1;
        unit = unit * 16 + value;
    }
    return unit;
}

/* Length of the well-formed UTF-8 sequence at data[at] (a byte >= 0x80), or 0: no overlong
   forms, no surrogates, nothing past U+10FFFF. */
static Py_ssize_t utf8_sequence(const unsigned char *data, Py_ssize_t length, Py_ssize_t at)
{
    unsigned char lead = data[at];
    Py_ssize_t size;
    unsigned char low = 0x80, high = 0xbf; /* bounds of the second byte */
    if (lead >= 0xc2 && lead <= 0xdf) {
        size = 2;
    } else if (lead >= 0xe0 && lead <= 0xef) {
        size = 3;
        if (lead == 0xe0)
            low = 0xa0;
        else if (lead == 0xed)
            high = 0x9f;
    } else if (lead >= 0xf0 && lead <= 0xf4) {
        size = 4;
        if (lead == 0xf0)
            low = 0x90;
        else if (lead == 0xf4)
            high = 0x8f;
    } else {
        return 0;
    }
    if (length - at < size || data[at + 1] < low || data[at + 1] > high)
        return 0;
    for (Py_ssize_t i = at + 2; i < at + size; i++)
        if (data[i] < 0x80 || data[i] > 0xbf)
            return 0;
    return size;
}

/* End of the JSON string starting at data[at] (a quote), or -1. Lone surrogate escapes are
   refused, as orjson refuses them. */
static Py_ssize_t scan_string(const unsigned char *data, Py_ssize_t length, Py_ssize_t at)
{
    Py_ssize_t i = at + 1;
    while (i < length) {
        /* to the next byte special_bytes flags, 8 bytes at a time while 8 are left */
        if (length - i >= 8) {
            uint64_t special = special_bytes(load8(data + i));
            if (special == 0) {
                i += 8;
                /* past 16 bytes, a long string: 32 bytes a step, fewer steps per byte (not
                   from the start: most strings are short, and the wider test costs more) */
                while (i - at > 16 && length - i >= 32
                       && (special_bytes(load8(data + i)) | special_bytes(load8(data + i + 8))
                           | special_bytes(load8(data + i + 16))
                           | special_bytes(load8(data + i + 24))) == 0)
                    i += 32;
                continue;
            }
            i += mask_offset(special);
        }
        unsigned char c = data[i];
        if (c == '"')
            return i + 1;
        if (c < 0x20)
            return -1;
        if (c == '\\') {
            if (i + 1 >= length)
                return -1;
            unsigned char kind = data[i + 1];
            if (kind == 'u') {
                long unit = unicode_escape(data, length, i);
                if (unit < 0 || (unit >= 0xdc00 && unit <= 0xdfff))
                    return -1;
                i += 6;
                if (unit >= 0xd800 && unit <= 0xdbff) {
                    long low = unicode_escape(data, length, i);
                    if (low < 0xdc00 || low > 0xdfff)
                        return -1;
                    i += 6;
                }
            } else if (kind != 0 && strchr("\"\\/bfnrt", kind) != NULL) {
                i += 2;
            } else {
                return -1;
            }
        } else if (c < 0x80) {
            i++;
        } else {
            Py_ssize_t size = utf8_sequence(data, length, i);
            if (size == 0)
                return -1;
            i += size;
        }
    }
    return -1;
}

static Py_ssize_t scan_digits(const unsigned char *data, Py_ssize_t length, Py_ssize_t i)
{
    while (i < length && data[i] >= '0' && data[i] <= '9')
        i++;
    return i;
}

/* End of the JSON number at data[at], or -1; also -1 for a number that might not be finite as
   a double (at or past 10**MAX_FINITE_DIGITS, or an exponent of more than
   MAX_EXPONENT_DIGITS digits). */
static Py_ssize_t scan_number(const unsigned char *data, Py_ssize_t length, Py_ssize_t at)
{
    Py_ssize_t i = at;
    if (i < length && data[i] == '-')
        i++;
    if (i >= length || data[i] < '0' || data[i] > '9')
        return -1;
    Py_ssize_t integer_start = i;
    i = data[i] == '0' ? i + 1 : scan_digits(data, length, i);
    Py_ssize_t integer_digits = i - integer_start;
    if (i < length && data[i] == '.') {
        Py_ssize_t fraction_start = i + 1;
        i = scan_digits(data, length, fraction_start);
        if (i == fraction_start)
            return -1;
    }
    long exponent = 0;
    if (i < length && (data[i] == 'e' || data[i] == 'E')) {
        i++;
        int negative = i < length && data[i] == '-';
        if (i < length && (data[i] == '-' || data[i] == '+'))
            i++;
        Py_ssize_t exponent_start = i;
        i = scan_digits(data, length, exponent_start);
        if (i == exponent_start || i - exponent_start > MAX_EXPONENT_DIGITS)
            return -1;
        for (Py_ssize_t at_digit = exponent_start; at_digit < i; at_digit++)
            exponent = exponent * 10 + (data[at_digit] - '0');
        if (negative)
            exponent = -exponent;
    }
    if (integer_digits > MAX_FINITE_DIGITS || integer_digits + exponent > MAX_FINITE_DIGITS)
        return -1;
    return i;
}

/* The "[" and "{" bytes in data, counted up to MAX_COPIED_CONTAINERS (memchr skips the rest
   of the bytes far faster than a loop over each). */
static Py_ssize_t count_containers(const unsigned char *data, Py_ssize_t length)
{
    Py_ssize_t containers = 0;
    for (const char *opener = "[{"; *opener != 0; opener++) {
        const unsigned char *at = data, *end = data + length;
        while (containers < MAX_COPIED_CONTAINERS
               && (at = memchr(at, *opener, (size_t)(end - at))) != NULL) {
            containers++;
            at++;
        }
    }
    return containers;
}

/* event.py's _is_copyable_json, or stricter: 1 only for a document orjson accepts (RFC 8259,
   UTF-8, no lone surrogate escapes, finite numbers) holding fewer "[" and "{" bytes than
   MAX_COPIED_CONTAINERS. 0 may also mean "not proven": the caller declines then. */
static int is_copyable_json(const unsigned char *data, Py_ssize_t length)
{
    /* (fewer bytes than that hold fewer of them: nothing to count) */
    if (length >= MAX_COPIED_CONTAINERS && count_containers(data, length) >= MAX_COPIED_CONTAINERS)
        return 0;
    char closers[MAX_COPIED_CONTAINERS]; /* depth <= containers */
    int depth = 0, is_key;
    Py_ssize_t i = 0;

value:
    i = skip_space(data, length, i);
    if (i >= length)
        return 0;
    switch (data[i]) {
    case '{':
        closers[depth++] = '}';
        i++;
        i = skip_space(data, length, i);
        if (i < length && data[i] == '}') {
            i++;
            depth--;
            goto after_value;
        }
        goto key;
    case '[':
        closers[depth++] = ']';
        i++;
        i = skip_space(data, length, i);
        if (i < length && data[i] == ']') {
            i++;
            depth--;
            goto after_value;
        }
        goto value;
    case '"':
        is_key = 0;
        goto string;
    case 't':
        i = length - i >= 4 && memcmp(data + i, "true", 4) == 0 ? i + 4 : -1;
        break;
    case 'f':
        i = length - i >= 5 && memcmp(data + i, "false", 5) == 0 ? i + 5 : -1;
        break;
    case 'n':
        i = length - i >= 4 && memcmp(data + i, "null", 4) == 0 ? i + 4 : -1;
        break;
    default:
        i = scan_number(data, length, i);
    }
    if (i < 0)
        return 0;
    goto after_value;

key: /* after "{" or "," in an object, spaces skipped */
    if (i >= length || data[i] != '"')
        return 0;
    is_key = 1;
string: /* one place that scans strings, keys and values: the scan is inlined there */
    i = scan_string(data, length, i);
    if (i < 0)
        return 0;
    if (!is_key)
        goto after_value;
    i = skip_space(data, length, i);
    if (i >= length || data[i] != ':')
        return 0;
    i++;
    goto value;

after_value:
    i = skip_space(data, length, i);
    if (depth == 0)
        return i == length;
    if (i >= length)
        return 0;
    if (data[i] == closers[depth - 1]) {
        i++;
        depth--;
        goto after_value;
    }
    if (data[i] != ',')
        return 0;
    i++;
    if (closers[depth - 1] == ']')
        goto value;
    i = skip_space(data, length, i);
    goto key;
}

/* Whether a str holds ASCII only (before 3.12 a str may need making ready first). */
static int is_ascii(PyObject *text)
{
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(text) < 0) {
        PyErr_Clear();
        return 0;
    }
#endif
    return PyUnicode_IS_ASCII(text) != 0;
}

static int ascii_equal_ignoring_case(const char *text, const char *lowercase, Py_ssize_t length)
{
    for (Py_ssize_t i = 0; i < length; i++) {
        char c = text[i];
        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        if (c != lowercase[i])
            return 0;
    }
    return 1;
}

/* DECLINE when the body must be gunzipped: the first header whose name is content-encoding
   (any case) has "gzip" (any case) in its value; also for a value that is not ASCII text.
   A name that is not ASCII never lowercases to "content-encoding" (the only non-ASCII
   characters Python lowercases to ASCII are U+212A KELVIN SIGN, to "k", and U+0130, to "i"
   and a combining dot), nor does a value lowercase to "gzip" then. */
static int check_gzip(const Headers *headers)
{
    static const char name[] = "content-encoding";
    for (Py_ssize_t i = 0; i < headers->count; i++) {
        if (headers->value_at[i] < 0)
            continue;
        PyObject *key = headers->names[i], *value = headers->values[headers->value_at[i]];
        if (!is_ascii(key) || PyUnicode_GET_LENGTH(key) != (Py_ssize_t)sizeof(name) - 1
                || !ascii_equal_ignoring_case(PyUnicode_DATA(key), name, sizeof(name) - 1))
            continue;
        if (!PyUnicode_CheckExact(value) || !is_ascii(value))
            return DECLINE;
        const char *text = PyUnicode_DATA(value);
        Py_ssize_t length = PyUnicode_GET_LENGTH(value);
        for (Py_ssize_t i = 0; i + 4 <= length; i++)
            if (ascii_equal_ignoring_case(text + i, "gzip", 4))
                return DECLINE;
        return OK;
    }
    return OK;
}

/* The body's JSON value, and its transfer_encoding in *encoding ("json", "base64" or NULL),
   as event.py's `_body` with `copy`. */
static int write_body(Encoder *self, Buffer *buffer, PyObject *raw, const Headers *headers,
                      int copy, int decoded, const char *side, const char **encoding)
{
    if (PyLong_CheckExact(raw)) {
        int overflow;
        long long size = PyLong_AsLongLongAndOverflow(raw, &overflow);
        if (size == -1 && PyErr_Occurred())
            return ERROR;
        if (overflow != 0 || self->max_body_size < 0)
            return DECLINE;
        char message[200];
        int length = snprintf(message, sizeof(message),
                              "{\"msg\":\"%s body of %lld bytes not captured: it is larger than "
                              "MAX_BODY_SIZE (%lld bytes)\"}", side, size, self->max_body_size);
        if (length < 0 || length >= (int)sizeof(message))
            return DECLINE;
        *encoding = "\"json\"";
        return buffer_write(buffer, message, length);
    }
    if (raw == Py_None || (PyBytes_CheckExact(raw) && PyBytes_GET_SIZE(raw) == 0)) {
        *encoding = "null";
        return WRITE_LITERAL(buffer, "null");
    }
    if (!PyBytes_CheckExact(raw))
        return DECLINE;
    if (!decoded) {
        int status = check_gzip(headers);
        if (status != OK)
            return status;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(raw);
    Py_ssize_t length = PyBytes_GET_SIZE(raw);
    if (data[0] == '{' || data[0] == '[') {
        if (!copy || !is_copyable_json(data, length))
            return DECLINE; /* body masks to apply, or JSON to parse in Python (or base64) */
        *encoding = "\"json\"";
        return buffer_write(buffer, (const char *)data, length);
    }
    *encoding = "\"base64\"";
    return write_base64(buffer, data, length);
}

/* --- times --------------------------------------------------------------------------------- */

/* `text` = the quote and "YYYY-MM-DDTHH:MM:SS." (SECOND_TEXT bytes) of a second since the
   epoch, UTC (every int64 of nanoseconds falls in years 1677 to 2262). */
static void format_second(long long seconds, char *text)
{
    long long days = seconds / 86400, second_of_day = seconds % 86400;
    if (second_of_day < 0) {
        second_of_day += 86400;
        days -= 1;
    }
    /* civil_from_days, H. Hinnant's algorithm (proleptic Gregorian calendar) */
    long long shifted = days + 719468;
    long long era = (shifted >= 0 ? shifted : shifted - 146096) / 146097;
    long long day_of_era = shifted - era * 146097;
    long long year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36524
                             - day_of_era / 146096) / 365;
    long long day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    long long month_index = (5 * day_of_year + 2) / 153;
    long long day = day_of_year - (153 * month_index + 2) / 5 + 1;
    long long month = month_index < 10 ? month_index + 3 : month_index - 9;
    long long year = year_of_era + era * 400 + (month <= 2);
    long long fields[] = {year, month, day, second_of_day / 3600, second_of_day / 60 % 60,
                          second_of_day % 60};
    static const int widths[] = {4, 2, 2, 2, 2, 2};
    static const char separators[] = "--T::."; /* after each field */
    int length = 0;
    text[length++] = '"';
    for (int field = 0; field < 6; field++) {
        for (int place = widths[field] - 1; place >= 0; place--) {
            text[length + place] = (char)('0' + fields[field] % 10);
            fields[field] /= 10;
        }
        length += widths[field];
        text[length++] = separators[field];
    }
}

/* The time "YYYY-MM-DDTHH:MM:SS." and 3 (incoming) or 6 fractional digits, UTC, for
   nanoseconds since the epoch. The text of the second is the encoder's last one when it is the
   same second, as consecutive times mostly are (event.py's _formatted_second; no Python code
   runs between reading and writing it here). */
static int write_time(Encoder *self, Buffer *buffer, long long time_ns, int incoming)
{
    long long seconds = time_ns / 1000000000LL;
    long long fraction = time_ns % 1000000000LL;
    if (fraction < 0) {
        fraction += 1000000000LL;
        seconds -= 1;
    }
    if (seconds != self->formatted_second) {
        format_second(seconds, self->second_text);
        self->formatted_second = seconds;
    }
    char text[SECOND_TEXT + 7];
    memcpy(text, self->second_text, SECOND_TEXT);
    int digits = incoming ? 3 : 6;
    long long value = incoming ? fraction / 1000000 : fraction / 1000;
    for (int place = SECOND_TEXT + digits - 1; place >= SECOND_TEXT; place--) {
        text[place] = (char)('0' + value % 10);
        value /= 10;
    }
    text[SECOND_TEXT + digits] = '"';
    return buffer_write(buffer, text, SECOND_TEXT + digits + 1);
}

static int time_ns_of(PyObject *value, long long *time_ns)
{
    if (!PyLong_CheckExact(value))
        return DECLINE;
    int overflow;
    *time_ns = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (*time_ns == -1 && PyErr_Occurred())
        return ERROR;
    return overflow == 0 ? OK : DECLINE;
}

/* --- headers: from the call ---------------------------------------------------------------- */

/* A new reference to dict[key], or NULL: not there (*status OK) or an error (*status ERROR). */
static PyObject *lookup(PyObject *dict, PyObject *key, int *status)
{
    PyObject *value = PyDict_GetItemWithError(dict, key);
    *status = value == NULL && PyErr_Occurred() ? ERROR : OK;
    Py_XINCREF(value);
    return value;
}

/* The request headers as event.py's `_event` has them before masks: for an incoming call
   `wire_headers` (names from META keys, through the builder's memo), for an outgoing one
   dict(zip(names, values)). */
static int gather_request_headers(Encoder *self, PyObject *columns, int incoming,
                                  Headers *headers)
{
    if (!PyTuple_CheckExact(columns) || PyTuple_GET_SIZE(columns) != 2)
        return DECLINE;
    PyObject *keys = PyTuple_GET_ITEM(columns, 0);
    PyObject *values = PyTuple_GET_ITEM(columns, 1);
    if (!PyTuple_CheckExact(keys) || !PyTuple_CheckExact(values)
            || PyTuple_GET_SIZE(keys) != PyTuple_GET_SIZE(values))
        return DECLINE;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(keys); i++) {
        PyObject *key = PyTuple_GET_ITEM(keys, i);
        if (!PyUnicode_CheckExact(key))
            return DECLINE;
        if (!incoming) {
            CHECK(headers_add(headers, key, PyTuple_GET_ITEM(values, i)));
            continue;
        }
        /* names.get(key) or self._incoming_header_name(key) */
        PyObject *name = PyDict_GetItemWithError(self->header_names, key);
        if (name == NULL && PyErr_Occurred())
            return ERROR;
        if (name != NULL && !PyUnicode_CheckExact(name))
            return DECLINE;
        if (name != NULL && PyUnicode_GET_LENGTH(name) != 0) {
            CHECK(headers_add(headers, name, PyTuple_GET_ITEM(values, i)));
            continue;
        }
        name = PyObject_CallOneArg(self->incoming_header_name, key);
        if (name == NULL)
            return ERROR;
        int status = PyUnicode_CheckExact(name)
                     ? headers_add(headers, name, PyTuple_GET_ITEM(values, i)) : DECLINE;
        Py_DECREF(name);
        CHECK(status);
    }
    return OK;
}

/* dict(pairs) for the response headers: pairs of a str and a value. */
static int gather_response_headers(PyObject *pairs, Headers *headers)
{
    if (!PyTuple_CheckExact(pairs))
        return DECLINE;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(pairs); i++) {
        PyObject *pair = PyTuple_GET_ITEM(pairs, i);
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2
                || !PyUnicode_CheckExact(PyTuple_GET_ITEM(pair, 0)))
            return DECLINE;
        CHECK(headers_add(headers, PyTuple_GET_ITEM(pair, 0), PyTuple_GET_ITEM(pair, 1)));
    }
    return OK;
}

/* A new reference to `name` lowercased as str.lower() does it. */
static PyObject *lowercase(PyObject *name)
{
    if (!is_ascii(name))
        return PyObject_CallMethod(name, "lower", NULL);
    const char *text = PyUnicode_DATA(name);
    Py_ssize_t length = PyUnicode_GET_LENGTH(name);
    Py_ssize_t first_upper = 0;
    while (first_upper < length && !(text[first_upper] >= 'A' && text[first_upper] <= 'Z'))
        first_upper++;
    if (first_upper == length)
        return Py_NewRef(name);
    PyObject *lowered = PyUnicode_New(length, 127);
    if (lowered == NULL)
        return NULL;
    char *out = PyUnicode_DATA(lowered);
    for (Py_ssize_t i = 0; i < length; i++)
        out[i] = text[i] >= 'A' && text[i] <= 'Z' ? (char)(text[i] - 'A' + 'a') : text[i];
    return lowered;
}

/* memo[key] = value, as event.py's `_remember`: the memo is emptied when it is full. */
static int remember(PyObject *memo, PyObject *key, PyObject *value)
{
    if (PyDict_GET_SIZE(memo) >= MEMO_ENTRIES)
        PyDict_Clear(memo);
    return PyDict_SetItem(memo, key, value) < 0 ? ERROR : OK;
}

/* event.py's `_apply_header_masks` with a mask list: the dict's entries in its order, every
   name lowercased, the masked ones left out. `memo` (the encoder's, one per side) remembers
   for each name its lowercase form, or None for a masked one: a pure function of the name
   under this side's masks, which saves making the lowercase str again for every call. */
static int mask_headers(PyObject *memo, PyObject *masks, const Headers *headers,
                        Headers *masked)
{
    for (Py_ssize_t i = 0; i < headers->count; i++) {
        if (headers->value_at[i] < 0)
            continue;
        PyObject *name = headers->names[i];
        PyObject *masked_name = PyDict_GetItemWithError(memo, name);
        if (masked_name == NULL) {
            if (PyErr_Occurred())
                return ERROR;
            PyObject *lowercase_name = lowercase(name);
            if (lowercase_name == NULL)
                return ERROR;
            int masked_out = PySet_Contains(masks, lowercase_name);
            int status = masked_out < 0 ? ERROR
                         : remember(memo, name, masked_out ? Py_None : lowercase_name);
            if (status == OK && !masked_out)
                status = headers_add(masked, lowercase_name, headers->values[headers->value_at[i]]);
            Py_DECREF(lowercase_name);
            CHECK(status);
            continue;
        }
        if (masked_name != Py_None)
            CHECK(headers_add(masked, masked_name, headers->values[headers->value_at[i]]));
    }
    return OK;
}

/* --- user id and client IP ----------------------------------------------------------------- */

/* EventBuilder.user_id_from_headers(headers), from its memo when the token is in it. */
static int user_id_of(Encoder *self, const Headers *headers, PyObject **out)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->authorization_headers); i++) {
        PyObject *token = header_value(headers, PyTuple_GET_ITEM(self->authorization_headers, i));
        if (token == NULL)
            continue;
        if (!PyUnicode_CheckExact(token))
            return DECLINE;
        if (PyUnicode_GET_LENGTH(token) == 0)
            continue;
        int status;
        *out = lookup(self->user_ids, token, &status);
        if (status != OK || *out != NULL)
            return status;
        PyObject *dict = headers_dict(headers);
        if (dict == NULL)
            return ERROR;
        *out = PyObject_CallOneArg(self->user_id_from_headers, dict);
        Py_DECREF(dict);
        return *out == NULL ? ERROR : OK;
    }
    *out = Py_NewRef(Py_None);
    return OK;
}

/* EventBuilder.client_ip(headers, remote_addr), from its memo while every header it reads is
   in it. */
static int client_ip_of(Encoder *self, const Headers *headers, PyObject *remote_addr,
                        PyObject **out)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->ip_headers); i++) {
        PyObject *name = PyTuple_GET_ITEM(self->ip_headers, i);
        PyObject *value = header_value(headers, name);
        if (value == NULL)
            continue;
        if (!PyUnicode_CheckExact(value))
            return DECLINE;
        if (PyUnicode_GET_LENGTH(value) == 0)
            continue;
        PyObject *key = PyTuple_Pack(2, name, value);
        if (key == NULL)
            return ERROR;
        int status;
        PyObject *address = lookup(self->addresses, key, &status);
        Py_DECREF(key);
        if (status != OK)
            return status;
        if (address == NULL) {
            PyObject *dict = headers_dict(headers);
            if (dict == NULL)
                return ERROR;
            *out = PyObject_CallFunctionObjArgs(self->client_ip, dict, remote_addr, NULL);
            Py_DECREF(dict);
            return *out == NULL ? ERROR : OK;
        }
        if (address == Py_None) {
            Py_DECREF(address);
            continue;
        }
        if (!PyUnicode_CheckExact(address) || PyUnicode_GET_LENGTH(address) == 0) {
            Py_DECREF(address);
            return DECLINE; /* the memo holds an address or None */
        }
        *out = address;
        return OK;
    }
    *out = Py_NewRef(remote_addr);
    return OK;
}

/* --- the event ----------------------------------------------------------------------------- */

/* What the event is written from. */
typedef struct {
    Headers request_wire;     /* incoming: by wire names; outgoing: as sent */
    Headers request_masked;   /* the request headers when there are masks */
    Headers response_sent;
    Headers response_masked;  /* the response headers when there are masks */
    PyObject *user_id;        /* new references, or NULL */
    PyObject *ip_address;
    PyObject *transaction_id;
} Parts;

static void parts_init(Parts *parts)
{
    parts->request_wire.count = parts->request_masked.count = 0;
    parts->response_sent.count = parts->response_masked.count = 0;
    parts->user_id = parts->ip_address = parts->transaction_id = NULL;
}

static void parts_clear(Parts *parts)
{
    headers_clear(&parts->request_wire);
    headers_clear(&parts->request_masked);
    headers_clear(&parts->response_sent);
    headers_clear(&parts->response_masked);
    Py_CLEAR(parts->user_id);
    Py_CLEAR(parts->ip_address);
    Py_CLEAR(parts->transaction_id);
}

static int encode_call(Encoder *self, PyObject *call, Parts *parts, Buffer *buffer)
{
    if (!PyTuple_Check(call) || PyTuple_GET_SIZE(call) != self->field_count
            || self->field_count < 18)
        return DECLINE;
#define FIELD(index) PyTuple_GET_ITEM(call, (index))
    PyObject *direction = FIELD(0);
    int incoming;
    if (!PyUnicode_CheckExact(direction))
        return DECLINE;
    if (PyUnicode_CompareWithASCIIString(direction, "Incoming") == 0)
        incoming = 1;
    else if (PyUnicode_CompareWithASCIIString(direction, "Outgoing") == 0)
        incoming = 0;
    else
        return DECLINE; /* the Python path drops it */
    long long request_time_ns, response_time_ns;
    CHECK(time_ns_of(FIELD(1), &request_time_ns));
    CHECK(time_ns_of(FIELD(2), &response_time_ns));
    PyObject *remote_addr = FIELD(6);
    PyObject *transaction_id = FIELD(11);
    if (transaction_id != Py_None && !PyUnicode_CheckExact(transaction_id))
        return DECLINE;
    int has_transaction_id = transaction_id != Py_None && PyUnicode_GET_LENGTH(transaction_id) > 0;

    Headers *request_headers = &parts->request_wire;
    CHECK(gather_request_headers(self, FIELD(5), incoming, request_headers));
    if (self->request_header_masks != Py_None) {
        index_headers(request_headers);
        CHECK(mask_headers(self->request_masked_names, self->request_header_masks,
                           request_headers, &parts->request_masked));
        request_headers = &parts->request_masked;
    }
    /* Without masks the request headers are the wire headers, as in event.py: the transaction
       header is in both (user_id_from_headers sees it). */
    if (has_transaction_id)
        CHECK(headers_add(request_headers, self->transaction_header, transaction_id));
    index_headers(request_headers);
    Headers *response_headers = &parts->response_sent;
    CHECK(gather_response_headers(FIELD(9), response_headers));
    index_headers(response_headers);
    if (self->response_header_masks != Py_None) {
        CHECK(mask_headers(self->response_masked_names, self->response_header_masks,
                           response_headers, &parts->response_masked));
        response_headers = &parts->response_masked;
        index_headers(response_headers);
    }

    PyObject *user_id = FIELD(12);
    if (user_id == Py_None && incoming)
        CHECK(user_id_of(self, &parts->request_wire, &parts->user_id));
    else
        parts->user_id = Py_NewRef(user_id);
    if (incoming)
        CHECK(client_ip_of(self, &parts->request_wire, remote_addr, &parts->ip_address));
    else
        parts->ip_address = Py_NewRef(Py_None);
    parts->transaction_id = has_transaction_id ? Py_NewRef(transaction_id)
                                               : PyObject_CallNoArgs(self->new_transaction_id);
    if (parts->transaction_id == NULL)
        return ERROR;

    const char *request_encoding = NULL, *response_encoding = NULL;
    CHECK(WRITE_LITERAL(buffer, "{\"request\":{\"time\":"));
    CHECK(write_time(self, buffer, request_time_ns, incoming));
    CHECK(WRITE_LITERAL(buffer, ",\"uri\":"));
    CHECK(write_value(buffer, FIELD(4), 2));
    CHECK(WRITE_LITERAL(buffer, ",\"verb\":"));
    CHECK(write_value(buffer, FIELD(3), 2));
    CHECK(WRITE_LITERAL(buffer, ",\"headers\":"));
    CHECK(write_headers(buffer, request_headers));
    CHECK(WRITE_LITERAL(buffer, ",\"api_version\":"));
    CHECK(write_value(buffer, self->api_version, 2));
    CHECK(WRITE_LITERAL(buffer, ",\"ip_address\":"));
    CHECK(write_value(buffer, parts->ip_address, 2));
    CHECK(WRITE_LITERAL(buffer, ",\"body\":"));
    CHECK(write_body(self, buffer, FIELD(7), request_headers, self->copy_request_body,
                     0, "request", &request_encoding));
    CHECK(WRITE_LITERAL(buffer, ",\"transfer_encoding\":"));
    CHECK(buffer_write(buffer, request_encoding, (Py_ssize_t)strlen(request_encoding)));
    CHECK(WRITE_LITERAL(buffer, "},\"response\":{\"time\":"));
    CHECK(write_time(self, buffer, response_time_ns, incoming));
    CHECK(WRITE_LITERAL(buffer, ",\"status\":"));
    CHECK(write_value(buffer, FIELD(8), 2));
    CHECK(WRITE_LITERAL(buffer, ",\"headers\":"));
    CHECK(write_headers(buffer, response_headers));
    CHECK(WRITE_LITERAL(buffer, ",\"body\":"));
    /* an outgoing response body is free of its Content-Encoding already (requests undid it) */
    CHECK(write_body(self, buffer, FIELD(10), response_headers, self->copy_response_body,
                     !incoming, "response", &response_encoding));
    CHECK(WRITE_LITERAL(buffer, ",\"ip_address\":null,\"transfer_encoding\":"));
    CHECK(buffer_write(buffer, response_encoding, (Py_ssize_t)strlen(response_encoding)));
    CHECK(WRITE_LITERAL(buffer, "},\"session_token\":"));
    CHECK(write_value(buffer, FIELD(14), 1));
    CHECK(WRITE_LITERAL(buffer, ",\"tags\":null,\"user_id\":"));
    CHECK(write_value(buffer, parts->user_id, 1));
    CHECK(WRITE_LITERAL(buffer, ",\"company_id\":"));
    CHECK(write_value(buffer, FIELD(13), 1));
    CHECK(WRITE_LITERAL(buffer, ",\"metadata\":"));
    CHECK(write_value(buffer, FIELD(15), 1));
    CHECK(WRITE_LITERAL(buffer, ",\"direction\":"));
    CHECK(write_value(buffer, direction, 1));
    CHECK(WRITE_LITERAL(buffer, ",\"weight\":"));
    CHECK(write_value(buffer, FIELD(16), 1));
    CHECK(WRITE_LITERAL(buffer, ",\"blocked_by\":"));
    CHECK(write_value(buffer, FIELD(17), 1));
    CHECK(WRITE_LITERAL(buffer, ",\"transaction_id\":"));
    CHECK(write_value(buffer, parts->transaction_id, 1));
    return WRITE_LITERAL(buffer, "}");
#undef FIELD
}

/* The event of `call` into `buffer`: OK, DECLINE or ERROR. */
static int encode_to_buffer(Encoder *self, PyObject *call, Buffer *buffer)
{
    if (self->new_transaction_id == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Encoder was not initialised");
        return ERROR;
    }
    Parts parts;
    parts_init(&parts);
    int status = encode_call(self, call, &parts, buffer);
    parts_clear(&parts);
    return status;
}

static PyObject *Encoder_encode(Encoder *self, PyObject *call)
{
    Buffer buffer;
    buffer_init(&buffer);
    int status = encode_to_buffer(self, call, &buffer);
    PyObject *result = status == OK ? PyBytes_FromStringAndSize(buffer.data, buffer.length)
                       : status == DECLINE ? Py_NewRef(Py_None) : NULL;
    buffer_free(&buffer);
    return result;
}

/* The event of `call` after the byte `prefix` in the bytearray `piece` at *offset, which moves
   past them; where they do not fit (nothing is written), *text gets the event's text as bytes.
   OK, DECLINE (nothing done) or ERROR. `piece` is never resized. */
static int encode_into_piece(Encoder *self, PyObject *call, PyObject *piece, Py_ssize_t *offset,
                             char prefix, PyObject **text)
{
    Buffer buffer;
    buffer_init(&buffer);
    int status = encode_to_buffer(self, call, &buffer);
    if (status == OK && buffer.length < PyByteArray_GET_SIZE(piece) - *offset) {
        char *at = PyByteArray_AS_STRING(piece) + *offset;
        at[0] = prefix;
        memcpy(at + 1, buffer.data, (size_t)buffer.length);
        *offset += 1 + buffer.length;
    } else if (status == OK) {
        *text = PyBytes_FromStringAndSize(buffer.data, buffer.length);
        if (*text == NULL)
            status = ERROR;
    }
    buffer_free(&buffer);
    return status;
}

/* encode_into(call, piece, offset, prefix): the byte `prefix` then the event's text written
   into the bytearray `piece` at `offset`, answering the offset after them; the text as bytes
   when they do not fit there (nothing is written); None for a call left to the Python path. */
static PyObject *Encoder_encode_into(Encoder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyByteArray_CheckExact(args[1]) || !PyLong_CheckExact(args[2])
            || !PyLong_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "encode_into(call, piece: bytearray, offset: int, prefix: int)");
        return NULL;
    }
    PyObject *piece = args[1];
    Py_ssize_t offset = PyLong_AsSsize_t(args[2]);
    long prefix = PyLong_AsLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (offset < 0 || offset > PyByteArray_GET_SIZE(piece) || prefix < 0 || prefix > 255) {
        PyErr_SetString(PyExc_ValueError, "offset outside the piece, or prefix not a byte");
        return NULL;
    }
    PyObject *text = NULL;
    int status = encode_into_piece(self, args[0], piece, &offset, (char)prefix, &text);
    if (status == ERROR)
        return NULL;
    if (status == DECLINE)
        Py_RETURN_NONE;
    return text != NULL ? text : PyLong_FromSsize_t(offset);
}

/* encode_records(payloads, lanes, positions, start, mark, decode, otherwise, tag, piece, offset,
   count): BatchWriter.add_records (event.py) in C. From payloads[start] on, for each record:
   mark(lanes[i], positions[i]), then call = decode(payloads[i]), or otherwise(payloads[i]) where
   decode answers NotImplemented; while the call is one this encoder writes, of settings tag
   `tag` or 0, its event goes into `piece` at `offset`, after "[" if `count` is 0, else ",".
   Answers (index, offset, count, decoded, text): `index` is the first record left to the
   caller (len(payloads) when none is), `decoded` the call or other answer decoded for it
   (NotImplemented when there is no such record), and `text` its event when it was written but
   did not fit in the piece (else None). An Exception while writing an event is not raised:
   the record is left, and the caller's way meets it again. */
static PyObject *Encoder_encode_records(Encoder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 11 || !PyList_CheckExact(args[0]) || !PyList_CheckExact(args[1])
            || !PyList_CheckExact(args[2]) || !PyLong_CheckExact(args[3])
            || !PyLong_CheckExact(args[7]) || !PyByteArray_CheckExact(args[8])
            || !PyLong_CheckExact(args[9]) || !PyLong_CheckExact(args[10])) {
        PyErr_SetString(PyExc_TypeError,
                        "encode_records(payloads: list, lanes: list, positions: list, start: int, "
                        "mark, decode, otherwise, tag: int, piece: bytearray, offset: int, "
                        "count: int)");
        return NULL;
    }
    PyObject *payloads = args[0], *lanes = args[1], *positions = args[2];
    PyObject *mark = args[4], *decode = args[5], *otherwise = args[6], *piece = args[8];
    Py_ssize_t index = PyLong_AsSsize_t(args[3]);
    long long tag = PyLong_AsLongLong(args[7]);
    Py_ssize_t offset = PyLong_AsSsize_t(args[9]);
    Py_ssize_t count = PyLong_AsSsize_t(args[10]);
    if (PyErr_Occurred())
        return NULL;
    if (index < 0 || offset < 0 || offset > PyByteArray_GET_SIZE(piece) || count < 0) {
        PyErr_SetString(PyExc_ValueError, "start, offset or count out of range");
        return NULL;
    }
    PyObject *decoded = Py_NewRef(Py_NotImplemented), *text = NULL;
    for (; index < PyList_GET_SIZE(payloads); index++) {
        if (index >= PyList_GET_SIZE(lanes) || index >= PyList_GET_SIZE(positions)) {
            PyErr_SetString(PyExc_ValueError, "fewer lanes or positions than payloads");
            goto error;
        }
        /* owned: mark and decode may be any callables, changing the lists */
        PyObject *place[2] = {Py_NewRef(PyList_GET_ITEM(lanes, index)),
                              Py_NewRef(PyList_GET_ITEM(positions, index))};
        PyObject *payload = Py_NewRef(PyList_GET_ITEM(payloads, index));
        PyObject *marked = PyObject_Vectorcall(mark, place, 2, NULL);
        Py_DECREF(place[0]);
        Py_DECREF(place[1]);
        if (marked != NULL) {
            Py_DECREF(marked);
            Py_SETREF(decoded, PyObject_Vectorcall(decode, &payload, 1, NULL));
            if (decoded == Py_NotImplemented)
                Py_SETREF(decoded, PyObject_Vectorcall(otherwise, &payload, 1, NULL));
        }
        Py_DECREF(payload);
        if (marked == NULL || decoded == NULL)
            goto error;
        if (!PyTuple_Check(decoded) || PyTuple_GET_SIZE(decoded) != self->field_count)
            break;
        PyObject *call_tag = PyTuple_GET_ITEM(decoded, self->field_count - 1);
        int overflow = 0;
        long long value = PyLong_CheckExact(call_tag)
                          ? PyLong_AsLongLongAndOverflow(call_tag, &overflow) : -1;
        if (overflow != 0 || (value != tag && value != 0))
            break;
        int status = encode_into_piece(self, decoded, piece, &offset, count == 0 ? '[' : ',',
                                       &text);
        /* as the caller's `except Exception`: it meets the error again, and counts it */
        if (status == ERROR && PyErr_ExceptionMatches(PyExc_Exception))
            PyErr_Clear();
        if (status != OK || text != NULL)
            break;
        count++;
        Py_SETREF(decoded, Py_NewRef(Py_NotImplemented));
    }
    if (PyErr_Occurred()) /* not an Exception (KeyboardInterrupt...): raised */
        goto error;
    return Py_BuildValue("(nnnNN)", index, offset, count, decoded,
                         text != NULL ? text : Py_NewRef(Py_None));
error:
    Py_XDECREF(decoded);
    Py_XDECREF(text);
    return NULL;
}

/* --- the type ------------------------------------------------------------------------------ */

static int check_str_tuple(PyObject *tuple, const char *what)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tuple); i++) {
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(tuple, i))) {
            PyErr_Format(PyExc_TypeError, "%s must be a tuple of str", what);
            return -1;
        }
    }
    return 0;
}

static int check_masks(PyObject *masks, const char *what)
{
    if (masks != Py_None && !PyFrozenSet_CheckExact(masks)) {
        PyErr_Format(PyExc_TypeError, "%s must be a frozenset or None", what);
        return -1;
    }
    return 0;
}

static int Encoder_init(Encoder *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {
        "field_count", "api_version", "request_header_masks", "response_header_masks",
        "copy_request_body", "copy_response_body", "authorization_headers", "ip_headers",
        "transaction_header", "max_body_size", "header_names", "user_ids", "addresses",
        "incoming_header_name", "user_id_from_headers", "client_ip", "new_transaction_id", NULL,
    };
    Py_ssize_t field_count;
    int copy_request_body, copy_response_body;
    PyObject *api_version, *request_header_masks, *response_header_masks;
    PyObject *authorization_headers, *ip_headers, *transaction_header, *max_body_size;
    PyObject *header_names, *user_ids, *addresses;
    PyObject *incoming_header_name, *user_id_from_headers, *client_ip, *new_transaction_id;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "$nOOOppO!O!UOO!O!O!OOOO", keywords, &field_count, &api_version,
            &request_header_masks, &response_header_masks, &copy_request_body,
            &copy_response_body, &PyTuple_Type, &authorization_headers, &PyTuple_Type,
            &ip_headers, &transaction_header, &max_body_size, &PyDict_Type, &header_names,
            &PyDict_Type, &user_ids, &PyDict_Type, &addresses, &incoming_header_name,
            &user_id_from_headers, &client_ip, &new_transaction_id))
        return -1;
    if (check_masks(request_header_masks, "request_header_masks") < 0
            || check_masks(response_header_masks, "response_header_masks") < 0
            || check_str_tuple(authorization_headers, "authorization_headers") < 0
            || check_str_tuple(ip_headers, "ip_headers") < 0)
        return -1;
    if (!PyUnicode_CheckExact(transaction_header)) {
        PyErr_SetString(PyExc_TypeError, "transaction_header must be a str");
        return -1;
    }
    long long body_limit = -1;
    if (PyLong_CheckExact(max_body_size)) {
        int overflow;
        body_limit = PyLong_AsLongLongAndOverflow(max_body_size, &overflow);
        if (body_limit == -1 && PyErr_Occurred())
            return -1;
        if (overflow != 0 || body_limit < 0)
            body_limit = -1;
    }
    PyObject *request_masked_names = PyDict_New();
    if (request_masked_names == NULL)
        return -1;
    PyObject *response_masked_names = PyDict_New();
    if (response_masked_names == NULL) {
        Py_DECREF(request_masked_names);
        return -1;
    }
    self->field_count = field_count;
    self->copy_request_body = copy_request_body;
    self->copy_response_body = copy_response_body;
    self->max_body_size = body_limit;
    self->formatted_second = 0;
    format_second(0, self->second_text);
    Py_XSETREF(self->api_version, Py_NewRef(api_version));
    Py_XSETREF(self->request_header_masks, Py_NewRef(request_header_masks));
    Py_XSETREF(self->response_header_masks, Py_NewRef(response_header_masks));
    Py_XSETREF(self->authorization_headers, Py_NewRef(authorization_headers));
    Py_XSETREF(self->ip_headers, Py_NewRef(ip_headers));
    Py_XSETREF(self->transaction_header, Py_NewRef(transaction_header));
    Py_XSETREF(self->header_names, Py_NewRef(header_names));
    Py_XSETREF(self->user_ids, Py_NewRef(user_ids));
    Py_XSETREF(self->addresses, Py_NewRef(addresses));
    Py_XSETREF(self->request_masked_names, request_masked_names);
    Py_XSETREF(self->response_masked_names, response_masked_names);
    Py_XSETREF(self->incoming_header_name, Py_NewRef(incoming_header_name));
    Py_XSETREF(self->user_id_from_headers, Py_NewRef(user_id_from_headers));
    Py_XSETREF(self->client_ip, Py_NewRef(client_ip));
    Py_XSETREF(self->new_transaction_id, Py_NewRef(new_transaction_id));
    return 0;
}

/* The callables are the builder's bound methods, and the builder holds this encoder: a cycle
   the garbage collector must see. */
static int Encoder_traverse(Encoder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->api_version);
    Py_VISIT(self->request_header_masks);
    Py_VISIT(self->response_header_masks);
    Py_VISIT(self->authorization_headers);
    Py_VISIT(self->ip_headers);
    Py_VISIT(self->transaction_header);
    Py_VISIT(self->header_names);
    Py_VISIT(self->user_ids);
    Py_VISIT(self->addresses);
    Py_VISIT(self->request_masked_names);
    Py_VISIT(self->response_masked_names);
    Py_VISIT(self->incoming_header_name);
    Py_VISIT(self->user_id_from_headers);
    Py_VISIT(self->client_ip);
    Py_VISIT(self->new_transaction_id);
    return 0;
}

static int Encoder_clear(Encoder *self)
{
    Py_CLEAR(self->api_version);
    Py_CLEAR(self->request_header_masks);
    Py_CLEAR(self->response_header_masks);
    Py_CLEAR(self->authorization_headers);
    Py_CLEAR(self->ip_headers);
    Py_CLEAR(self->transaction_header);
    Py_CLEAR(self->header_names);
    Py_CLEAR(self->user_ids);
    Py_CLEAR(self->addresses);
    Py_CLEAR(self->request_masked_names);
    Py_CLEAR(self->response_masked_names);
    Py_CLEAR(self->incoming_header_name);
    Py_CLEAR(self->user_id_from_headers);
    Py_CLEAR(self->client_ip);
    Py_CLEAR(self->new_transaction_id);
    return 0;
}

static void Encoder_dealloc(Encoder *self)
{
    PyObject_GC_UnTrack(self);
    Encoder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)Encoder_encode, METH_O,
     "encode(call) -> bytes | None: EventBuilder.encode(call), or None to use the Python path."},
    {"encode_into", (PyCFunction)(void (*)(void))Encoder_encode_into, METH_FASTCALL,
     "encode_into(call, piece, offset, prefix) -> int | bytes | None: `prefix` and encode(call)\n"
     "written into the bytearray `piece` at `offset`, giving the offset after them; the text\n"
     "when it does not fit there; None to use the Python path."},
    {"encode_records", (PyCFunction)(void (*)(void))Encoder_encode_records, METH_FASTCALL,
     "encode_records(payloads, lanes, positions, start, mark, decode, otherwise, tag, piece,\n"
     "offset, count)\n"
     "-> (index, offset, count, decoded, text): see BatchWriter.add_records."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "moesif_fast._eventjson.Encoder",
    .tp_doc = "The compiled EventBuilder.encode for one builder's options (see event.py).",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_traverse = (traverseproc)Encoder_traverse,
    .tp_clear = (inquiry)Encoder_clear,
    .tp_methods = Encoder_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "moesif_fast._eventjson",
    .m_doc = "A CapturedCall's Moesif event as JSON text, in C (see event.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__eventjson(void)
{
    fill_base64_pairs();
    if (PyType_Ready(&EncoderType) < 0)
        return NULL;
    PyObject *result = PyModule_Create(&module);
    if (result == NULL)
        return NULL;
    if (PyModule_AddObjectRef(result, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}
