"""Classical solvers, each returned as an exact :class:`bns.NSSolver`.

``grid`` is always the classical solver's own step grid (midpoint on m steps: NFE 2m). Pass
``transform=ScheduleChange(...)`` (or :func:`bns.transforms.precondition`) to run the solver on
a scheduler-changed ODE and export it in the model's original coordinates; the grid is then in
the new time ``r``.
"""

from .multistep import adams_bashforth, ipndm
from .runge_kutta import euler, heun, midpoint, rk4

__all__ = ["euler", "midpoint", "heun", "rk4", "adams_bashforth", "ipndm"]
