/* The entry points of _t5ops.c, registered in _qlinear.c's module (one extension, engine.runtime._qlinear). */
#ifndef ENGINE_T5OPS_H
#define ENGINE_T5OPS_H
#include <Python.h>

PyObject *t5ops_rms_norm(PyObject *self, PyObject *args);
PyObject *t5ops_activation(PyObject *self, PyObject *args);
PyObject *t5ops_attention(PyObject *self, PyObject *args);
PyObject *t5ops_decoder_plan(PyObject *self, PyObject *args);
PyObject *t5ops_decoder_layers(PyObject *self, PyObject *args);
PyObject *t5ops_layers_timing(PyObject *self, PyObject *args);
PyObject *t5ops_layers_timing_read(PyObject *self, PyObject *args);

#endif
