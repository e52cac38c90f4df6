/* The compiled exit decoders' engine: one call per VP exit turns the
 * 256-byte hv_message into its frozen dataclass.
 *
 * What to read comes from Python (fastdecode.py), which takes every offset,
 * size and bit position from the binding's layout: nothing about the mshv
 * structs is written here.  A plan is a tuple of fields; each is
 *
 *     (name, UINT, offset, size, shift, width)   an unsigned integer (shift -1: whole)
 *     (name, BOOL, offset, size, shift, width)   the same, as a bool
 *     (name, HEADER, offset, size)               the intercept header's bytes, through a memo
 *     (name, SEGMENT, leaf, leaf, leaf, leaf)    base, limit, selector, attributes, through a memo
 *     (name, BYTES, offset, length, count_leaf)  instruction bytes: count bytes (0 or past the array: all)
 *
 * where a leaf is (offset, size, shift, width).  The memos are dicts the
 * Python side owns, with a function it calls on a miss (which fills the memo).
 *
 * Why C: building a 12-field frozen dataclass in Python costs more than the
 * simulated exit it describes; here it is one allocation and one dict.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum kind { KIND_UINT, KIND_BOOL, KIND_HEADER, KIND_SEGMENT, KIND_BYTES };

struct leaf {
    Py_ssize_t offset, size;
    int shift, width;
};

struct field {
    PyObject *name;          /* interned str */
    enum kind kind;
    struct leaf leaf[4];     /* UINT/BOOL: [0]; SEGMENT: the four; BYTES: [0] is the count */
    Py_ssize_t offset, size; /* HEADER: the raw span; BYTES: the array */
};

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyTypeObject *result;
    PyObject *header_memo, *header_miss;     /* dict raw bytes -> header; f(buffer, offset) */
    PyObject *segment_memo, *segment_miss;   /* dict (4 ints) -> segment; f(tuple) */
    Py_ssize_t count;
    Py_ssize_t span;                         /* bytes past the base every field lies within */
    struct field fields[];
} Decoder;

static int parse_leaf(PyObject *tuple, Py_ssize_t first, struct leaf *leaf)
{
    if (PyTuple_GET_SIZE(tuple) < first + 4)
        return -1;
    leaf->offset = PyLong_AsSsize_t(PyTuple_GET_ITEM(tuple, first));
    leaf->size = PyLong_AsSsize_t(PyTuple_GET_ITEM(tuple, first + 1));
    leaf->shift = (int)PyLong_AsLong(PyTuple_GET_ITEM(tuple, first + 2));
    leaf->width = (int)PyLong_AsLong(PyTuple_GET_ITEM(tuple, first + 3));
    if (PyErr_Occurred())
        return -1;
    if (leaf->offset < 0 || (leaf->size != 1 && leaf->size != 2 && leaf->size != 4 && leaf->size != 8)
        || leaf->shift >= 64 || leaf->width > 64)
        return -1;
    return 0;
}

/* A byte span's (offset, size), the plan entry's items 2 and 3. */
static int parse_span(PyObject *item, struct field *f)
{
    f->offset = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 2));
    f->size = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 3));
    return PyErr_Occurred() || f->offset < 0 || f->size <= 0 ? -1 : 0;
}

static Py_ssize_t leaf_end(const struct leaf *leaf)
{
    return leaf->offset + leaf->size;
}

static uint64_t read_leaf(const uint8_t *base, const struct leaf *leaf)
{
    uint64_t value = 0;
    for (Py_ssize_t i = leaf->size - 1; i >= 0; i--)   /* little-endian, any alignment */
        value = (value << 8) | base[leaf->offset + i];
    if (leaf->shift >= 0) {
        value >>= leaf->shift;
        if (leaf->width < 64)
            value &= ((uint64_t)1 << leaf->width) - 1;
    }
    return value;
}

static PyObject *decoder_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames);

static void decoder_dealloc(PyObject *op)
{
    Decoder *d = (Decoder *)op;
    for (Py_ssize_t i = 0; i < d->count; i++)
        Py_XDECREF(d->fields[i].name);
    Py_XDECREF(d->result);
    Py_XDECREF(d->header_memo);
    Py_XDECREF(d->header_miss);
    Py_XDECREF(d->segment_memo);
    Py_XDECREF(d->segment_miss);
    Py_TYPE(op)->tp_free(op);
}

static PyTypeObject DecoderType;

static PyObject *decoder_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *result, *plan, *header_memo, *header_miss, *segment_memo, *segment_miss;
    static char *names[] = {"result", "plan", "header_memo", "header_miss", "segment_memo", "segment_miss", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!O!OO!O:Decoder", names, &PyType_Type, &result, &PyTuple_Type, &plan,
                                     &PyDict_Type, &header_memo, &header_miss, &PyDict_Type, &segment_memo, &segment_miss))
        return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(plan);
    Decoder *d = (Decoder *)type->tp_alloc(type, count);
    if (d == NULL)
        return NULL;
    d->vectorcall = decoder_call;
    d->result = (PyTypeObject *)Py_NewRef(result);
    d->header_memo = Py_NewRef(header_memo);
    d->header_miss = Py_NewRef(header_miss);
    d->segment_memo = Py_NewRef(segment_memo);
    d->segment_miss = Py_NewRef(segment_miss);
    d->span = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyTuple_GET_ITEM(plan, i);
        struct field *f = &d->fields[i];
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 2 || !PyUnicode_Check(PyTuple_GET_ITEM(item, 0)))
            goto bad;
        f->name = Py_NewRef(PyTuple_GET_ITEM(item, 0));
        PyUnicode_InternInPlace(&f->name);
        d->count = i + 1;   /* the names so far are released on failure */
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(item, 1));
        Py_ssize_t end = 0;
        switch (kind) {
        case KIND_UINT:
        case KIND_BOOL:
            if (parse_leaf(item, 2, &f->leaf[0]) < 0)
                goto bad;
            end = leaf_end(&f->leaf[0]);
            break;
        case KIND_HEADER:
            if (PyTuple_GET_SIZE(item) != 4 || parse_span(item, f) < 0)
                goto bad;
            end = f->offset + f->size;
            break;
        case KIND_SEGMENT:
            if (PyTuple_GET_SIZE(item) != 6)
                goto bad;
            for (int j = 0; j < 4; j++) {
                PyObject *sub = PyTuple_GET_ITEM(item, 2 + j);
                if (!PyTuple_Check(sub) || parse_leaf(sub, 0, &f->leaf[j]) < 0)
                    goto bad;
                if (leaf_end(&f->leaf[j]) > end)
                    end = leaf_end(&f->leaf[j]);
            }
            break;
        case KIND_BYTES: {
            PyObject *count_leaf = PyTuple_GET_SIZE(item) == 5 ? PyTuple_GET_ITEM(item, 4) : NULL;
            if (count_leaf == NULL || !PyTuple_Check(count_leaf) || parse_leaf(count_leaf, 0, &f->leaf[0]) < 0
                || parse_span(item, f) < 0)
                goto bad;
            end = f->offset + f->size;
            if (leaf_end(&f->leaf[0]) > end)
                end = leaf_end(&f->leaf[0]);
            break;
        }
        default:
            goto bad;
        }
        f->kind = (enum kind)kind;
        if (end > d->span)
            d->span = end;
    }
    return (PyObject *)d;
bad:
    if (!PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "field %zd of the plan is not one this decoder knows", d->count - 1);
    Py_DECREF(d);
    return NULL;
}

/* The value of one field; a new reference. */
static PyObject *field_value(Decoder *d, const struct field *f, PyObject *buffer, const uint8_t *base, Py_ssize_t offset)
{
    switch (f->kind) {
    case KIND_UINT:
        return PyLong_FromUnsignedLongLong(read_leaf(base, &f->leaf[0]));
    case KIND_BOOL:
        return PyBool_FromLong(read_leaf(base, &f->leaf[0]) != 0);
    case KIND_HEADER: {
        PyObject *raw = PyBytes_FromStringAndSize((const char *)base + f->offset, f->size);
        if (raw == NULL)
            return NULL;
        PyObject *found = PyDict_GetItemWithError(d->header_memo, raw);
        Py_DECREF(raw);
        if (found != NULL)
            return Py_NewRef(found);
        if (PyErr_Occurred())
            return NULL;
        PyObject *at = PyLong_FromSsize_t(offset + f->offset);
        if (at == NULL)
            return NULL;
        PyObject *made = PyObject_CallFunctionObjArgs(d->header_miss, buffer, at, NULL);
        Py_DECREF(at);
        return made;
    }
    case KIND_SEGMENT: {
        PyObject *key = PyTuple_New(4);
        if (key == NULL)
            return NULL;
        for (int j = 0; j < 4; j++) {
            PyObject *part = PyLong_FromUnsignedLongLong(read_leaf(base, &f->leaf[j]));
            if (part == NULL) {
                Py_DECREF(key);
                return NULL;
            }
            PyTuple_SET_ITEM(key, j, part);
        }
        PyObject *found = PyDict_GetItemWithError(d->segment_memo, key);
        PyObject *made = found != NULL ? Py_NewRef(found)
                       : PyErr_Occurred() ? NULL
                       : PyObject_CallOneArg(d->segment_miss, key);
        Py_DECREF(key);
        return made;
    }
    case KIND_BYTES: {
        uint64_t count = read_leaf(base, &f->leaf[0]);
        Py_ssize_t length = count == 0 || count > (uint64_t)f->size ? f->size : (Py_ssize_t)count;
        return PyBytes_FromStringAndSize((const char *)base + f->offset, length);
    }
    }
    PyErr_SetString(PyExc_SystemError, "a field of unknown kind");
    return NULL;
}

static PyObject *decoder_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Decoder *d = (Decoder *)self;
    if (PyVectorcall_NARGS(nargsf) != 2 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a decoder takes (buffer, payload offset)");
        return NULL;
    }
    PyObject *buffer = args[0];
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *made = NULL, *values = NULL;
    if (offset < 0 || offset > view.len || view.len - offset < d->span) {
        PyErr_Format(PyExc_ValueError, "the message is %zd bytes: a payload at %zd of %zd does not fit",
                     view.len, offset, d->span);
        goto out;
    }
    const uint8_t *base = (const uint8_t *)view.buf + offset;
#if PY_VERSION_HEX < 0x030D0000
    values = _PyDict_NewPresized(d->count);
#else
    values = PyDict_New();
#endif
    if (values == NULL)
        goto out;
    for (Py_ssize_t i = 0; i < d->count; i++) {
        PyObject *value = field_value(d, &d->fields[i], buffer, base, offset);
        if (value == NULL)
            goto out;
        int failed = PyDict_SetItem(values, d->fields[i].name, value);
        Py_DECREF(value);
        if (failed)
            goto out;
    }
    /* object.__new__ without the dataclass's __init__ (frozen: its fields are set once, here) */
    made = d->result->tp_alloc(d->result, 0);
    if (made != NULL && PyObject_GenericSetDict(made, values, NULL) < 0)
        Py_CLEAR(made);
out:
    Py_XDECREF(values);
    PyBuffer_Release(&view);
    return made;
}

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mshvstack.partition._exitcore.Decoder",
    .tp_doc = PyDoc_STR("Decoder(result, plan, header_memo, header_miss, segment_memo, segment_miss):"
                        " called with (buffer, payload offset), returns a result built from the plan's fields"),
    .tp_basicsize = sizeof(Decoder),
    .tp_itemsize = sizeof(struct field),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Decoder, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = decoder_new,
    .tp_dealloc = decoder_dealloc,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mshvstack.partition._exitcore",
    .m_doc = "Compiled VP exit decoders (plans from fastdecode.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__exitcore(void)
{
    if (PyType_Ready(&DecoderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Decoder", (PyObject *)&DecoderType) < 0
        || PyModule_AddIntConstant(m, "UINT", KIND_UINT) < 0 || PyModule_AddIntConstant(m, "BOOL", KIND_BOOL) < 0
        || PyModule_AddIntConstant(m, "HEADER", KIND_HEADER) < 0 || PyModule_AddIntConstant(m, "SEGMENT", KIND_SEGMENT) < 0
        || PyModule_AddIntConstant(m, "BYTES", KIND_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
