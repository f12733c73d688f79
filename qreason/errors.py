"""The one error type users see: bad input, reported as a single line with exit code 2."""


class UserError(Exception):
    """Bad input (config, data, checkpoint, reply). The message names the place and is printed as one line."""

    exit_code = 2

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}")
