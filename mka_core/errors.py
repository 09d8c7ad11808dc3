"""The one error type the library raises for bad input, and the progress-callback convention."""

from __future__ import annotations

from collections.abc import Callable

# A progress callback gets the fraction done in [0, 1] and a short human-readable message.
# The CLI prints it, the app feeds st.progress with it; library code never prints.
ProgressFn = Callable[[float, str], None]


class MkaInputError(ValueError):
    """Bad input from a user: a wrong path, a malformed plan, an unsupported model, an empty text.

    The message is one line that names the value and what was expected; the CLI prints it as is
    and the app shows it with st.error.
    """


def report(progress: ProgressFn | None, fraction: float, message: str) -> None:
    """Call `progress` if there is one (so callers need no `if progress:` everywhere)."""
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0), message)
