/*
 * vhdx_fastread.c - the per-call entry of the chain reader (vhdx_reader_read)
 * as a CPython extension type, built as ``vhdx._fastread``.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * Why not cffi for this one call: a cffi call needs ffi.from_buffer() for the
 * caller's buffer plus the generic argument conversion, ~0.35 us per read -
 * a quarter of a random 4 KiB read from the page cache. Here one
 * PyObject_GetBuffer and a METH_FASTCALL method do the same for ~0.1 us.
 * Everything else (geometry checks, the read itself) is vhdx_native.c,
 * compiled into this module too.
 *
 * ChainReader(levels): levels is a sequence of 9-tuples, child first:
 *   (fd, table, table_offset, entries, virtual_size, block_size, chunk_ratio,
 *    sector_size, cache_bitmaps)
 * where `table` exports a buffer holding `entries` host-order uint64 BAT
 * entries at byte `table_offset` (8-aligned). A legacy VHD chain passes
 * 8-tuples instead (every level the same kind):
 *   (fd, table, table_offset, entries, virtual_size, block_size, fixed,
 *    cache_bitmaps)
 * with host-order uint32 BAT entries (4-aligned; none for a fixed level). The reader holds the buffers
 * until it is deallocated. Pass the object that owns the memory (a bytearray
 * or array), not a memoryview: CPython's cyclic GC can clear a memoryview
 * that still has exports, and the later release crashes. This type holds no
 * references that could form a cycle, so it is not GC-tracked.
 *
 * readinto(offset, buffer) -> int | None: bytes filled (short at the end of
 * the disk), or None when the read must be redone on the Python path (the
 * buffer is not a writable C-contiguous buffer, the offset is not a
 * non-negative int64, an I/O error, VHDX_EFALLBACK). Never raises for those,
 * so the caller's fallback produces the real error message.
 *
 * read(offset, size) -> bytes | None: the same read into a new bytes object
 * built once at its final length (clipped at the end of the disk) and filled
 * in place with the GIL released: no intermediate buffer, no copy. None as
 * for readinto (and for a negative size).
 *
 * Stable ABI: compiled with Py_LIMITED_API = 3.11 (the buffer protocol and
 * Py_buffer joined the limited API then), the type built by PyType_FromSpec,
 * no access to object internals, so one .abi3.so serves every CPython >= 3.11.
 * Nothing on the per-call path changed: METH_FASTCALL, one PyObject_GetBuffer.
 */
#define PY_SSIZE_T_CLEAN
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030B0000 /* also set by csrc/build_native.py */
#endif
#include <Python.h>

#include "vhdx_native.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    vhdx_reader *reader;
    unsigned long long size; /* virtual size of the top level: read() clips to it */
    Py_ssize_t nviews;
    Py_buffer *views; /* one per level, released in dealloc */
} ChainReaderObject;

static void cr_dealloc(PyObject *obj)
{
    ChainReaderObject *self = (ChainReaderObject *)obj;
    PyTypeObject *tp = Py_TYPE(obj);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    Py_ssize_t i;

    vhdx_reader_free(self->reader);
    for (i = 0; i < self->nviews; i++)
        PyBuffer_Release(&self->views[i]);
    PyMem_Free(self->views);
    tp_free(obj);
    Py_DECREF(tp); /* instances of a heap type hold a reference to it */
}

static int set_level(vhdx_rlevel *d, Py_buffer *view, PyObject *item)
{
    int fd, cache;
    PyObject *table;
    unsigned long long off, entries, vsize, bs, cr, lss;

    if (!PyTuple_Check(item) || PyTuple_Size(item) != 9) {
        PyErr_SetString(PyExc_TypeError, "a level is a 9-tuple");
        return -1;
    }
    if (!PyArg_ParseTuple(item, "iOKKKKKKp", &fd, &table, &off, &entries, &vsize, &bs,
                          &cr, &lss, &cache))
        return -1;
    if (PyObject_GetBuffer(table, view, PyBUF_SIMPLE) != 0)
        return -1;
    if (off > (unsigned long long)view->len || entries > ((unsigned long long)view->len - off) / 8 ||
        ((uintptr_t)((const char *)view->buf + off) & 7) || lss > UINT32_MAX) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "table range outside its buffer, misaligned, or bad sector size");
        return -1;
    }
    d->fd = fd;
    d->cache_bitmaps = cache;
    d->bat = (const uint64_t *)(const void *)((const char *)view->buf + off);
    d->bat_entries = entries;
    d->virtual_size = vsize;
    d->block_size = bs;
    d->chunk_ratio = cr;
    d->sector_size = (uint32_t)lss;
    return 0;
}

static int set_vhd_level(vhdx_vhd_level *d, Py_buffer *view, PyObject *item)
{
    int fd, fixed, cache;
    PyObject *table;
    unsigned long long off, entries, vsize, bs;

    if (!PyTuple_Check(item) || PyTuple_Size(item) != 8) {
        PyErr_SetString(PyExc_TypeError, "a VHD level is an 8-tuple");
        return -1;
    }
    if (!PyArg_ParseTuple(item, "iOKKKKpp", &fd, &table, &off, &entries, &vsize, &bs, &fixed, &cache))
        return -1;
    if (PyObject_GetBuffer(table, view, PyBUF_SIMPLE) != 0)
        return -1;
    if (off > (unsigned long long)view->len || entries > ((unsigned long long)view->len - off) / 4 ||
        ((uintptr_t)((const char *)view->buf + off) & 3)) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "table range outside its buffer or misaligned");
        return -1;
    }
    d->fd = fd;
    d->cache_bitmaps = cache;
    d->fixed = fixed;
    d->bat = fixed ? NULL : (const uint32_t *)(const void *)((const char *)view->buf + off);
    d->bat_entries = entries;
    d->virtual_size = vsize;
    d->block_size = bs;
    return 0;
}

static PyObject *cr_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *seq, *items;
    ChainReaderObject *self;
    vhdx_rlevel *levels;
    vhdx_vhd_level *vlevels = NULL;
    Py_ssize_t n, i;
    int rc, vhd;

    if (kwds && PyDict_Size(kwds)) {
        PyErr_SetString(PyExc_TypeError, "ChainReader() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O", &seq))
        return NULL;
    /* A tuple copy: the limited API has no PySequence_Fast_* macros, and the
     * copy cannot change under us while the levels are parsed. */
    items = PySequence_Tuple(seq);
    if (!items)
        return NULL;
    n = PyTuple_Size(items);
    /* the first level's tuple length tells the format; the others must match */
    vhd = n > 0 && PyTuple_Check(PyTuple_GetItem(items, 0)) && PyTuple_Size(PyTuple_GetItem(items, 0)) == 8;
    self = (ChainReaderObject *)PyType_GenericAlloc(type, 0); /* zero-filled */
    levels = n && !vhd ? (vhdx_rlevel *)PyMem_Calloc((size_t)n, sizeof *levels) : NULL;
    vlevels = n && vhd ? (vhdx_vhd_level *)PyMem_Calloc((size_t)n, sizeof *vlevels) : NULL;
    if (self)
        self->views = n ? (Py_buffer *)PyMem_Calloc((size_t)n, sizeof(Py_buffer)) : NULL;
    if (!self || (n && ((!levels && !vlevels) || !self->views))) {
        Py_XDECREF((PyObject *)self);
        PyMem_Free(levels);
        PyMem_Free(vlevels);
        Py_DECREF(items);
        return PyErr_NoMemory();
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PyTuple_GetItem(items, i);
        if ((vhd ? set_vhd_level(&vlevels[i], &self->views[i], item)
                 : set_level(&levels[i], &self->views[i], item)) != 0)
            goto fail;
        self->nviews = i + 1;
    }
    if (vhd) {
        self->size = n ? (unsigned long long)vlevels[0].virtual_size : 0;
        rc = vhdx_vhd_reader_new(vlevels, (size_t)n, &self->reader);
    } else {
        self->size = n ? (unsigned long long)levels[0].virtual_size : 0;
        rc = vhdx_reader_new(levels, (size_t)n, &self->reader);
    }
    if (rc == VHDX_EARG) {
        PyErr_SetString(PyExc_ValueError, "invalid chain geometry for the native reader");
        goto fail;
    }
    if (rc) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    PyMem_Free(levels);
    PyMem_Free(vlevels);
    Py_DECREF(items);
    return (PyObject *)self;
fail:
    PyMem_Free(levels);
    PyMem_Free(vlevels);
    Py_DECREF(items);
    Py_DECREF((PyObject *)self);
    return NULL;
}

static PyObject *cr_readinto(ChainReaderObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    unsigned long long off;
    int64_t n;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "readinto(offset, buffer)");
        return NULL;
    }
    off = PyLong_AsUnsignedLongLong(args[0]); /* negative or not an int: None */
    if (off == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    /* PyBUF_WRITABLE without strides: exporters refuse non-contiguous views */
    if (PyObject_GetBuffer(args[1], &view, PyBUF_WRITABLE) != 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    Py_BEGIN_ALLOW_THREADS
    n = vhdx_reader_read(self->reader, (uint64_t)off, (uint8_t *)view.buf, (size_t)view.len, NULL);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (n < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong((long long)n);
}

static PyObject *cr_read(ChainReaderObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long off;
    Py_ssize_t want;
    PyObject *out;
    int64_t n;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "read(offset, size)");
        return NULL;
    }
    off = PyLong_AsUnsignedLongLong(args[0]);
    if (off == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    want = PyLong_AsSsize_t(args[1]);
    if (want < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (off >= self->size)
        want = 0;
    else if ((unsigned long long)want > self->size - off)
        want = (Py_ssize_t)(self->size - off);
    out = PyBytes_FromStringAndSize(NULL, want);
    if (!out)
        return NULL;
    if (want == 0)
        return out;
    {
        /* The new object is not shared with anyone yet: filling it without the
         * GIL is safe, and it is the result, so nothing is copied. */
        uint8_t *buf = (uint8_t *)PyBytes_AsString(out);
        Py_BEGIN_ALLOW_THREADS
        n = vhdx_reader_read(self->reader, (uint64_t)off, buf, (size_t)want, NULL);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            Py_DECREF(out);
            Py_RETURN_NONE;
        }
        if (n != (int64_t)want) { /* not expected (the size was clipped): keep what was read */
            PyObject *shorter = PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)n);
            Py_DECREF(out);
            return shorter;
        }
    }
    return out;
}

static PyObject *cr_invalidate(ChainReaderObject *self, PyObject *unused)
{
    (void)unused;
    vhdx_reader_invalidate(self->reader);
    Py_RETURN_NONE;
}

static PyMethodDef cr_methods[] = {
    {"readinto", (PyCFunction)(void (*)(void))cr_readinto, METH_FASTCALL,
     "readinto(offset, buffer) -> bytes filled, or None: redo the read in Python"},
    {"read", (PyCFunction)(void (*)(void))cr_read, METH_FASTCALL,
     "read(offset, size) -> bytes (clipped at the end of the disk), or None: redo the read in Python"},
    {"invalidate", (PyCFunction)cr_invalidate, METH_NOARGS,
     "forget the cached sector bitmaps"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot cr_slots[] = {
    {Py_tp_doc, (void *)"The chain reader of vhdx_native.c with a cheap per-call entry."},
    {Py_tp_new, (void *)cr_new},
    {Py_tp_dealloc, (void *)cr_dealloc},
    {Py_tp_methods, (void *)cr_methods},
    {0, NULL},
};

/* Not GC-tracked: the type holds no references that could form a cycle (see the top). */
static PyType_Spec cr_spec = {
    "vhdx._fastread.ChainReader", sizeof(ChainReaderObject), 0, Py_TPFLAGS_DEFAULT, cr_slots,
};

static struct PyModuleDef fastread_module = {
    PyModuleDef_HEAD_INIT, "vhdx._fastread",
    "Per-call entry of the native chain reader (see csrc/vhdx_fastread.c).", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastread(void)
{
    PyObject *m, *type;
    if (!vhdx_native_io_supported()) {
        PyErr_SetString(PyExc_ImportError, "no POSIX I/O on this platform");
        return NULL;
    }
    m = PyModule_Create(&fastread_module);
    if (!m)
        return NULL;
    type = PyType_FromSpec(&cr_spec);
    if (!type || PyModule_AddObjectRef(m, "ChainReader", type) < 0) {
        Py_XDECREF(type);
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(type); /* the module holds it now */
    return m;
}
