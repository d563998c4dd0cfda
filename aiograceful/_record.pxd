# Cython declarations beside the Python source (pure-Python mode): the .py is the
# module, this file only makes its classes extension types, so that the compiled
# code reads and writes their attributes at a fixed offset instead of by name.
# Every attribute is a Python object (no C coercion: the same values as the pure
# module); one line per name of the class's __slots__. Keep the two in step.

from aiograceful._deadlines cimport Timed
from aiograceful._state cimport HalfCloseMachine


cdef class CloseRecord(Timed):
    cdef public object _acked_at
    cdef public object _acked_mark
    cdef public object _forward
    cdef public object _future
    cdef public object _hard_deadline
    cdef public object _idle_timeout
    cdef public object _on_idle
    cdef public object _on_quiet
    cdef public object _options
    cdef public object _outstanding
    cdef public object _poll
    cdef public object _progress_at
    cdef public object _sock
    cdef public object _sock_unix
    cdef public object _started
    cdef public object _trailing
    cdef public object _waiters
    cdef public object discarded
    cdef public object last_read
    cdef public object loop
    cdef public HalfCloseMachine machine
    cdef public object on_lost
    cdef public object outcome
    cdef public object result
    cdef public object transport
    cdef public object unacked
