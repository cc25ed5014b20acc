"""Writes that fail for want of room (a full disk, a quota, a file-size limit) end in one line naming the path.

Every writer of this project writes under a temporary name and renames, or commits with a marker written last, so
such a failure leaves nothing half-written visible and nothing committed lost; the same command completes once
space is freed. `writing` turns the failure, however the library underneath reports it (OSError, safetensors' or
torch's own errors), into `WriteFailed`, which the command lines print as one line.
"""

import errno
import os
from contextlib import contextmanager

from cache_schema.layout import CacheError

NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# What libraries that write through their own code say instead of raising an OSError with an errno.
NO_ROOM_WORDS = ("No space left on device", "File too large", "Disk quota exceeded", "file write failed",
                 "StorageFull", "FileTooLarge")


class WriteFailed(CacheError):
    """A write ran out of room."""


def out_of_room(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in NO_ROOM:
        return True
    return any(word in str(e) for word in NO_ROOM_WORDS)


@contextmanager
def writing(what: str, path):
    """Within the block, a write that runs out of room raises WriteFailed naming `what` and `path`."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as e:
        if not out_of_room(e):
            raise
        if isinstance(e, OSError) and e.errno in NO_ROOM:
            reason = os.strerror(e.errno)
        else:  # the system's words inside the library's message, where it has them
            reason = next((w for w in NO_ROOM_WORDS[:3] if w in str(e)), str(e).splitlines()[0])
        raise WriteFailed(f"{what} {path} could not be written: {reason}; nothing half-written is visible and "
                          "nothing committed was lost: free space and run the same command again") from e
