"""The error hierarchy: every error pickles intact (it crosses the process pool) and has its own code."""

from __future__ import annotations

import importlib
import pickle
import pkgutil

import pytest

import analysis_service
from analysis_service import errors
from analysis_service.errors import AnalysisServiceError, PermanentError, TransientError


def _import_all_modules() -> None:
    """Import every module of the package, so subclasses defined outside errors.py are seen too."""
    for module in pkgutil.walk_packages(analysis_service.__path__, prefix="analysis_service."):
        if module.name.rsplit(".", 1)[-1] != "__main__":  # ``cli/__main__`` runs the command line
            importlib.import_module(module.name)


def _subclasses(cls: type[AnalysisServiceError]) -> list[type[AnalysisServiceError]]:
    found: list[type[AnalysisServiceError]] = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return sorted(set(found), key=lambda c: f"{c.__module__}.{c.__qualname__}")


_import_all_modules()
SUBCLASSES = _subclasses(AnalysisServiceError)
ALL = [AnalysisServiceError, *SUBCLASSES]


def _id(cls: type[AnalysisServiceError]) -> str:
    return cls.__qualname__


def test_the_hierarchy_was_found() -> None:
    names = {cls.__name__ for cls in SUBCLASSES}

    assert {"FileMissing", "SilentAudio", "UnknownAnalyzer", "SinkUnavailable", "InternalError"} <= names
    worker_errors = [cls for cls in SUBCLASSES if cls.__module__ == errors.__name__]
    assert all(issubclass(cls, PermanentError | TransientError) for cls in worker_errors), (
        "every error of errors.py is either permanent or transient"
    )
    assert not issubclass(PermanentError, TransientError)


@pytest.mark.parametrize("cls", ALL, ids=_id)
@pytest.mark.parametrize("path", ["/media/a b/ü.mp3", None], ids=["with-path", "without-path"])
def test_pickles_with_message_and_path(cls: type[AnalysisServiceError], path: str | None) -> None:
    original = cls("something went wrong: 3.5 s", path=path)

    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(original, protocol=protocol))

        assert type(copy) is cls
        assert copy.message == "something went wrong: 3.5 s"
        assert copy.path == path
        assert copy.code == cls.code
        assert str(copy) == str(original)
        assert copy.args == original.args


def test_str_names_the_path() -> None:
    assert str(errors.FileMissing("no such file", path="/x/y.wav")) == "no such file (/x/y.wav)"
    assert str(errors.FileMissing("no such file")) == "no such file"


@pytest.mark.parametrize("cls", ALL, ids=_id)
def test_code_is_a_non_empty_identifier(cls: type[AnalysisServiceError]) -> None:
    assert isinstance(cls.code, str)
    assert cls.code
    assert cls.code == cls.code.strip().lower()
    assert cls.code.replace("_", "").isalnum()


def test_codes_are_unique() -> None:
    by_code: dict[str, list[str]] = {}
    for cls in SUBCLASSES:
        by_code.setdefault(cls.code, []).append(cls.__qualname__)

    assert {code: names for code, names in by_code.items() if len(names) > 1} == {}
    # The root is never raised itself; its code is the one of a bug.
    assert AnalysisServiceError.code == errors.InternalError.code == "internal_error"


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (errors.FileMissing, "file_not_found"),
        (errors.EmptyFile, "empty_file"),
        (errors.NotAudio, "not_audio"),
        (errors.TruncatedAudio, "truncated_audio"),
        (errors.SilentAudio, "silent_audio"),
        (errors.TooShort, "too_short"),
        (errors.TooLong, "too_long"),
        (errors.UnsupportedAudio, "unsupported_audio"),
        (errors.DecoderUnavailable, "decoder_unavailable"),
        (errors.UnknownAnalyzer, "unknown_analyzer"),
    ],
)
def test_documented_codes_are_stable(cls: type[AnalysisServiceError], code: str) -> None:
    assert cls.code == code
