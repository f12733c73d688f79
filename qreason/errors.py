"""The one error type users see: bad input, reported as a single line with exit code 2."""


class UserError(Exception):
    """Bad input (config, data, checkpoint, reply). The message names the place and is printed as one line."""

    exit_code = 2

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}")


def decode_utf8(data: bytes, where: str) -> str:
    """The text of a file a user gave (config, task, data); bytes that are not UTF-8 are a UserError naming
    the file and the line, not a UnicodeDecodeError traceback."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserError(
            f"{where}:{line}",
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); save the file as UTF-8",
        ) from None
