"""The one exception type for rejected input.

Every check on user-supplied data (images, masks, prompts, frames) raises
`InputError` with a message that names the sample, object or frame at fault,
so a bad record is reported where it enters instead of crashing deep inside
a kernel.
"""


class InputError(ValueError):
    """Raised when an input (image, mask, prompt, video frame) is rejected."""
