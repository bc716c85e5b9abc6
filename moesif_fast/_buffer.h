/* A growable output buffer for the compiled extensions: bytes written at its end, kept inline
   (on the C stack) until they outgrow BUFFER_INLINE_BYTES, then on the Python heap.

   Use: `Buffer buffer; buffer_init(&buffer);`, then `buffer_write`..., then `buffer_free`.
   `buffer_reserve` and `buffer_write` return 0, or -1 with MemoryError set. */

#ifndef MOESIF_FAST_BUFFER_H
#define MOESIF_FAST_BUFFER_H

#include <Python.h>
#include <string.h>

#define BUFFER_INLINE_BYTES 4096

typedef struct {
    char *data;
    Py_ssize_t length;
    Py_ssize_t capacity;
    char inline_data[BUFFER_INLINE_BYTES];
} Buffer;

static void buffer_init(Buffer *buffer)
{
    buffer->data = buffer->inline_data;
    buffer->length = 0;
    buffer->capacity = sizeof(buffer->inline_data);
}

static void buffer_free(Buffer *buffer)
{
    if (buffer->data != buffer->inline_data)
        PyMem_Free(buffer->data);
}

/* Room for `extra` more bytes. */
static int buffer_reserve(Buffer *buffer, Py_ssize_t extra)
{
    if (extra <= buffer->capacity - buffer->length)
        return 0;
    if (extra > PY_SSIZE_T_MAX / 2 - buffer->length) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t capacity = (buffer->length + extra) * 2;
    char *data;
    if (buffer->data == buffer->inline_data) {
        data = PyMem_Malloc((size_t)capacity);
        if (data != NULL)
            memcpy(data, buffer->data, (size_t)buffer->length);
    } else {
        data = PyMem_Realloc(buffer->data, (size_t)capacity);
    }
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    buffer->data = data;
    buffer->capacity = capacity;
    return 0;
}

static int buffer_write(Buffer *buffer, const char *bytes, Py_ssize_t length)
{
    if (buffer_reserve(buffer, length) < 0)
        return -1;
    memcpy(buffer->data + buffer->length, bytes, (size_t)length);
    buffer->length += length;
    return 0;
}

#endif
