# Cython declarations beside the Python source (pure-Python mode): the .py is the
# module, this file only makes its classes extension types, so that the compiled
# code reads and writes their attributes at a fixed offset instead of by name.
# Every attribute is a Python object (no C coercion: the same values as the pure
# module); one line per name of the class's __slots__. Keep the two in step.

cdef class _Deadlines:
    cdef public object _loop
    cdef public list _heap
    cdef public object _live
    cdef public object _dead
    cdef public object _handle
    cdef public object _handle_when

cdef class Timed:
    cdef public _Deadlines _deadlines
    cdef public object _entry
    cdef public object when

cdef class DeadlineTimer(Timed):
    cdef public object _callback
