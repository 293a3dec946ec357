/* The entry points of _choose.c, registered in _qlinear.c's module (one extension, engine.runtime._qlinear). */
#ifndef ENGINE_CHOOSE_H
#define ENGINE_CHOOSE_H
#include <Python.h>

PyObject *choose_top_k_softmax(PyObject *self, PyObject *args);
PyObject *choose_degeneration_penalty(PyObject *self, PyObject *args);
PyObject *choose_top_k_softmax_rows(PyObject *self, PyObject *args);

#endif
