"""Files qreason writes atomically are ordinary files (readable by others, like the report a web server
serves), not the private files the temporary-file call makes."""

from qreason.store import write_atomic


def test_an_atomically_written_file_is_readable_by_others(tmp_path):
    path = tmp_path / "report.html"
    write_atomic(path, "<html></html>")
    assert oct(path.stat().st_mode)[-3:] == "644"
    write_atomic(path, "<html>again</html>")  # replacing keeps it so
    assert oct(path.stat().st_mode)[-3:] == "644" and path.read_text() == "<html>again</html>"
