/* Chained block keys of a prompt's token ids, in C: the same keys as the pure-Python
 * BlockSchedule (pixiu_kv/routing/_blocks.py), computed without building a tuple per block.
 *
 * key_i = hash((key_{i-1}, tuple(tokens[end_{i-1}:end_i])))
 *
 * CPython's tuple hash (xxHash-style lanes, unchanged since 3.8) is reproduced here over
 * the ids' own hashes; the Python side checks once at import that both agree and uses the
 * pure-Python path if they do not (a future interpreter may hash tuples differently).
 * Optional: the package installs and works without it (setup.py marks it optional).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#if SIZEOF_VOID_P < 8
#error "64-bit builds only (the Python fallback serves the others)"
#endif

#define XXPRIME_1 ((Py_uhash_t)11400714785074694791ULL)
#define XXPRIME_2 ((Py_uhash_t)14029467366897019727ULL)
#define XXPRIME_5 ((Py_uhash_t)2870177450012600261ULL)
#define XXROTATE(x) (((x) << 31) | ((x) >> 33))

static inline Py_uhash_t lane(Py_uhash_t acc, Py_uhash_t h) {
    acc += h * XXPRIME_2;
    acc = XXROTATE(acc);
    return acc * XXPRIME_1;
}

static inline Py_hash_t finish(Py_uhash_t acc, Py_ssize_t len) {
    acc += (Py_uhash_t)len ^ (XXPRIME_5 ^ 3527539UL);
    if (acc == (Py_uhash_t)-1) {
        return 1546275796;
    }
    return (Py_hash_t)acc;
}

/* hash((hprev, block)) where block_hash is the block tuple's hash. */
static inline Py_hash_t pair_hash(Py_hash_t hprev, Py_hash_t block_hash) {
    return finish(lane(lane(XXPRIME_5, (Py_uhash_t)hprev), (Py_uhash_t)block_hash), 2);
}

/* hash(item) for an exact int of one digit (|v| < 2**30): the value itself, -1 -> -2
 * (CPython's int hash). Returns 0 for any other object, whose hash is PyObject_Hash's; no
 * Python code runs here. */
static inline int small_int_hash(PyObject *item, Py_hash_t *h) {
    if (!PyLong_CheckExact(item)) {
        return 0;
    }
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject *)item)) {
        return 0;
    }
    Py_ssize_t v = PyUnstable_Long_CompactValue((PyLongObject *)item);
#else
    Py_ssize_t size = Py_SIZE(item);
    if (size < -1 || size > 1) {
        return 0;
    }
    Py_ssize_t v = size * (Py_ssize_t)((PyLongObject *)item)->ob_digit[0];
#endif
    *h = v == -1 ? -2 : (Py_hash_t)v;
    return 1;
}

/* ends[b] as an index in [prev, n]; ends is a tuple (owned by the caller, immutable). */
static int block_end(PyObject *ends, Py_ssize_t b, Py_ssize_t prev, Py_ssize_t n, Py_ssize_t *end) {
    *end = PyLong_AsSsize_t(PyTuple_GET_ITEM(ends, b));
    if (*end == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (*end < prev || *end > n) {
        PyErr_Format(PyExc_ValueError, "block end %zd outside [%zd, %zd]", *end, prev, n);
        return -1;
    }
    return 0;
}

static int check_start(Py_ssize_t start, Py_ssize_t n) {
    if (start < 0 || start > n) {
        PyErr_Format(PyExc_ValueError, "start %zd outside [0, %zd]", start, n);
        return -1;
    }
    return 0;
}

/* Sets out[b] = key_b for each block of seq (a list or tuple); hprev is hash(key_{-1}).
 * Items are read through the sequence's own array (borrowed): hashing an item that is not a
 * small int may run Python code (a __hash__) that resizes a list, so after such a call the
 * array is read again and a change of size is an error. */
static int chain_objects(PyObject *seq, Py_ssize_t start, PyObject *ends, PyObject *out, Py_hash_t hprev) {
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t nb = PyTuple_GET_SIZE(ends);
    Py_ssize_t prev = start;
    if (check_start(start, n) < 0) {
        return -1;
    }
    for (Py_ssize_t b = 0; b < nb; b++) {
        Py_ssize_t end;
        if (block_end(ends, b, prev, n, &end) < 0) {
            return -1;
        }
        Py_uhash_t acc = XXPRIME_5;
        for (Py_ssize_t i = prev; i < end; i++) {
            Py_hash_t h;
            if (!small_int_hash(items[i], &h)) {
                PyObject *item = items[i];
                Py_INCREF(item);
                h = PyObject_Hash(item);
                Py_DECREF(item);
                if (h == -1 && PyErr_Occurred()) {
                    return -1;
                }
                if (PySequence_Fast_GET_SIZE(seq) != n) {
                    PyErr_SetString(PyExc_RuntimeError, "tokens changed size while being hashed");
                    return -1;
                }
                items = PySequence_Fast_ITEMS(seq);
            }
            acc = lane(acc, (Py_uhash_t)h);
        }
        PyObject *k = PyLong_FromSsize_t(pair_hash(hprev, finish(acc, end - prev)));
        if (k == NULL) {
            return -1;
        }
        PyList_SET_ITEM(out, b, k);
        hprev = PyObject_Hash(k); /* an int's: cannot fail */
        prev = end;
    }
    return 0;
}

/* The same over packed unsigned 32-bit ids (array('I')): hash(v) == v for them. The buffer
 * need not be aligned (a memoryview cast may start anywhere): ids are read with memcpy. */
static int chain_u32(const unsigned char *ids, Py_ssize_t n, Py_ssize_t start, PyObject *ends,
                     PyObject *out, Py_hash_t hprev) {
    Py_ssize_t nb = PyTuple_GET_SIZE(ends);
    Py_ssize_t prev = start;
    if (check_start(start, n) < 0) {
        return -1;
    }
    for (Py_ssize_t b = 0; b < nb; b++) {
        Py_ssize_t end;
        if (block_end(ends, b, prev, n, &end) < 0) {
            return -1;
        }
        Py_uhash_t acc = XXPRIME_5;
        for (Py_ssize_t i = prev; i < end; i++) {
            uint32_t v;
            memcpy(&v, ids + 4 * i, 4);
            acc = lane(acc, (Py_uhash_t)v);
        }
        PyObject *k = PyLong_FromSsize_t(pair_hash(hprev, finish(acc, end - prev)));
        if (k == NULL) {
            return -1;
        }
        PyList_SET_ITEM(out, b, k);
        hprev = PyObject_Hash(k);
        prev = end;
    }
    return 0;
}

PyDoc_STRVAR(chain_doc,
"chain(tokens, start, ends, key, /) -> list[int]\n\n"
"Chained keys of the blocks tokens[start:ends[0]], tokens[ends[0]:ends[1]], ...,\n"
"the first chained to ``key``: what BlockSchedule's pure-Python loop computes.\n"
"``tokens``: a list or tuple of ints (any hashable items), a C-contiguous buffer of\n"
"unsigned 32-bit ints (format 'I', as array('I')), or another iterable (copied).\n"
"ValueError if start or an end is outside the tokens or the ends decrease; TypeError\n"
"for a buffer of another format.");

static PyObject *chain(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "chain(tokens, start, ends, key) takes 4 arguments");
        return NULL;
    }
    PyObject *tokens = args[0];
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_hash_t hprev = PyObject_Hash(args[3]);
    if (hprev == -1 && PyErr_Occurred()) {
        return NULL;
    }
    /* A tuple of our own: hashing a token cannot change it under us (a list could). */
    PyObject *ends = PySequence_Tuple(args[2]);
    if (ends == NULL) {
        return NULL;
    }
    /* Items NULL until set; on an error the list is freed with them (list dealloc skips NULL). */
    PyObject *out = PyList_New(PyTuple_GET_SIZE(ends));
    int rc = -1;
    if (out == NULL) {
        goto done;
    }
    if (PyList_CheckExact(tokens) || PyTuple_CheckExact(tokens)) {
        rc = chain_objects(tokens, start, ends, out, hprev);
    }
    else if (PyObject_CheckBuffer(tokens)) {
        Py_buffer view;
        if (PyObject_GetBuffer(tokens, &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) == 0) {
            if (view.itemsize == 4 && view.format != NULL && strcmp(view.format, "I") == 0) {
                rc = chain_u32((const unsigned char *)view.buf, view.len / 4, start, ends, out, hprev);
            }
            else {
                PyErr_SetString(PyExc_TypeError, "a buffer of token ids must hold unsigned 32-bit ints ('I')");
            }
            PyBuffer_Release(&view);
        }
    }
    else {
        /* A list subclass comes back as itself, anything else as a new list. */
        PyObject *seq = PySequence_Fast(tokens, "tokens must be a sequence of ints");
        if (seq != NULL) {
            rc = chain_objects(seq, start, ends, out, hprev);
            Py_DECREF(seq);
        }
    }
done:
    Py_DECREF(ends);
    if (rc < 0) {
        Py_XDECREF(out);
        return NULL;
    }
    return out;
}

static PyMethodDef methods[] = {
    {"chain", (PyCFunction)(void (*)(void))chain, METH_FASTCALL, chain_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_blockhash",
    .m_doc = "Chained block keys of token ids (see chain).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__blockhash(void) {
    return PyModule_Create(&module);
}
