# Cython declarations beside the Python source (pure-Python mode): the .py is the
# module, this file only makes its classes extension types, so that the compiled
# code reads and writes their attributes at a fixed offset instead of by name.
# Every attribute is a Python object (no C coercion: the same values as the pure
# module); one line per name of the class's __slots__. Keep the two in step.

cdef class HalfCloseMachine:
    cdef public object state
    cdef public object peer_eof
    cdef public object eof_written
