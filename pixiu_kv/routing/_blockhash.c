/* The routing decision's per-block loops, in C (optional; the package works without it).
 *
 * chain: chained block keys of a prompt's token ids, the same keys as the pure-Python
 * BlockSchedule (pixiu_kv/routing/_blocks.py), computed without building a tuple per block.
 * stamp, depths: PrefixIndex's record and match loops (pixiu_kv/routing/_prefix_index.py),
 * the same dictionary reads and writes in the same order as its pure-Python code.
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

/* Stores key_b = hash((key_{b-1}, block_b)) in out[b], given the block's lane accumulator and
 * length, and moves *hprev (hash(key_{b-1})) on to hash(key_b). */
static int emit_key(PyObject *out, Py_ssize_t b, Py_hash_t *hprev, Py_uhash_t acc, Py_ssize_t len) {
    PyObject *k = PyLong_FromSsize_t(pair_hash(*hprev, finish(acc, len)));
    if (k == NULL) {
        return -1;
    }
    PyList_SET_ITEM(out, b, k);
    *hprev = PyObject_Hash(k); /* an int's: cannot fail */
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
        if (emit_key(out, b, &hprev, acc, end - prev) < 0) {
            return -1;
        }
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
        if (emit_key(out, b, &hprev, acc, end - prev) < 0) {
            return -1;
        }
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

/* -- PrefixIndex: an endpoint's dict of block key -> stamp (float) ----------------------- */

PyDoc_STRVAR(stamp_doc,
"stamp(held, keys, value) -> list\n\n"
"Each key's value in ``held`` before (None: absent), then ``held[key] = value`` for every\n"
"key, in order: PrefixIndex.record's loop. ``held`` a dict, ``keys`` a tuple.");

static PyObject *stamp(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyDict_CheckExact(args[0]) || !PyTuple_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "stamp(held: dict, keys: tuple, value) takes 3 arguments");
        return NULL;
    }
    PyObject *held = args[0];
    PyObject *keys = args[1];
    PyObject *value = args[2];
    Py_ssize_t n = PyTuple_GET_SIZE(keys);
    PyObject *prior = PyList_New(n);
    if (prior == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyTuple_GET_ITEM(keys, i);
        PyObject *old = PyDict_GetItemWithError(held, key);  /* borrowed */
        if (old == NULL) {
            if (PyErr_Occurred()) {
                goto fail;
            }
            old = Py_None;
        }
        Py_INCREF(old);
        PyList_SET_ITEM(prior, i, old);
        if (PyDict_SetItem(held, key, value) < 0) {
            goto fail;
        }
    }
    return prior;
fail:
    Py_DECREF(prior);
    return NULL;
}

/* 1 if held[key] exists and is >= cutoff, 0 if not, -1 on error. */
static int held_at(PyObject *held, PyObject *key, double cutoff) {
    PyObject *value = PyDict_GetItemWithError(held, key);  /* borrowed */
    if (value == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    double stamp = PyFloat_AsDouble(value);
    if (stamp == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    return stamp >= cutoff;
}

/* Look up a float in a dict of endpoint id -> float, with a default. */
static int float_of(PyObject *dict, PyObject *key, double fallback, double *out) {
    PyObject *value = PyDict_GetItemWithError(dict, key);  /* borrowed */
    if (value == NULL) {
        if (PyErr_Occurred()) {
            return -1;
        }
        *out = fallback;
        return 0;
    }
    *out = PyFloat_AsDouble(value);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

PyDoc_STRVAR(depths_doc,
"depths(held_by_endpoint, keys, ends, inserted, capacity, default_capacity) -> (dict, int)\n\n"
"PrefixIndex.match's loop: for each endpoint whose first block is held (stamp >= its\n"
"cutoff, inserted - capacity), the end of the deepest held block, found by a binary\n"
"search that first tries the previous holder's depth; and the number of dict probes.");

static PyObject *depths(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6 || !PyDict_CheckExact(args[0]) || !PyTuple_CheckExact(args[1])
            || !PyTuple_CheckExact(args[2]) || !PyDict_CheckExact(args[3]) || !PyDict_CheckExact(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "depths(held_by_endpoint: dict, keys: tuple, ends: tuple, inserted: dict, "
                        "capacity: dict, default_capacity: float) takes 6 arguments");
        return NULL;
    }
    PyObject *by_endpoint = args[0];
    PyObject *keys = args[1];
    PyObject *ends = args[2];
    PyObject *inserted = args[3];
    PyObject *capacity = args[4];
    double default_capacity = PyFloat_AsDouble(args[5]);
    if (default_capacity == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t last = PyTuple_GET_SIZE(keys) - 1;
    if (PyTuple_GET_SIZE(ends) != last + 1) {
        PyErr_SetString(PyExc_ValueError, "keys and ends differ in length");
        return NULL;
    }
    PyObject *matched = PyDict_New();
    if (matched == NULL) {
        return NULL;
    }
    long probes = 0;
    if (last >= 0) {
        PyObject *first = PyTuple_GET_ITEM(keys, 0);
        Py_ssize_t pos = 0;
        Py_ssize_t hint = -1;
        PyObject *endpoint_id;
        PyObject *held;
        /* The dicts are only read here, so iterating by_endpoint is safe. */
        while (PyDict_Next(by_endpoint, &pos, &endpoint_id, &held)) {
            if (!PyDict_CheckExact(held)) {
                PyErr_SetString(PyExc_TypeError, "an endpoint's entries must be a dict");
                goto fail;
            }
            probes++;
            PyObject *value = PyDict_GetItemWithError(held, first);  /* borrowed */
            if (value == NULL) {
                if (PyErr_Occurred()) {
                    goto fail;
                }
                continue;
            }
            double stamp = PyFloat_AsDouble(value);
            double counter, size;
            if ((stamp == -1.0 && PyErr_Occurred()) || float_of(inserted, endpoint_id, 0.0, &counter) < 0
                    || float_of(capacity, endpoint_id, default_capacity, &size) < 0) {
                goto fail;
            }
            double cutoff = counter - size;
            if (stamp < cutoff) {
                continue;
            }
            Py_ssize_t lo = 0;
            Py_ssize_t hi = last;
            int is;
            if (hint > 0) {
                probes++;
                if ((is = held_at(held, PyTuple_GET_ITEM(keys, hint), cutoff)) < 0) {
                    goto fail;
                }
                if (is) {
                    lo = hint;
                    if (hint < last) {
                        probes++;
                        if ((is = held_at(held, PyTuple_GET_ITEM(keys, hint + 1), cutoff)) < 0) {
                            goto fail;
                        }
                        if (is) {
                            lo = hint + 1;
                        }
                        else {
                            hi = hint;
                        }
                    }
                }
                else {
                    hi = hint - 1;
                }
            }
            while (lo < hi) {
                Py_ssize_t mid = (lo + hi + 1) / 2;
                probes++;
                if ((is = held_at(held, PyTuple_GET_ITEM(keys, mid), cutoff)) < 0) {
                    goto fail;
                }
                if (is) {
                    lo = mid;
                }
                else {
                    hi = mid - 1;
                }
            }
            if (PyDict_SetItem(matched, endpoint_id, PyTuple_GET_ITEM(ends, lo)) < 0) {
                goto fail;
            }
            hint = lo;
        }
    }
    return Py_BuildValue("(Nl)", matched, probes);  /* steals matched, even on failure */
fail:
    Py_DECREF(matched);
    return NULL;
}

static PyMethodDef methods[] = {
    {"chain", (PyCFunction)(void (*)(void))chain, METH_FASTCALL, chain_doc},
    {"stamp", (PyCFunction)(void (*)(void))stamp, METH_FASTCALL, stamp_doc},
    {"depths", (PyCFunction)(void (*)(void))depths, METH_FASTCALL, depths_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_blockhash",
    .m_doc = "The routing decision's per-block loops: chain (block keys), stamp and depths (the prefix index).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__blockhash(void) {
    return PyModule_Create(&module);
}
