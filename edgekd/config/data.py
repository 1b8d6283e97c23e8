"""data: the dataset a run reads (images or text) and the forms data.files takes."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from .base import Section

__all__ = ["FILES_TAGS", "TEXT_ONLY_DATA", "DataConfig", "IdxFiles", "TextSplitFiles"]


class IdxFiles(Section):
    """The four IDX files of data.dataset idx / fashion-mnist, each relative to data.root (or absolute);
    one left out is read under its standard name (e.g. train-images-idx3-ubyte.gz) in data.root."""

    train_images: str | None = None
    train_labels: str | None = None
    test_images: str | None = None
    test_labels: str | None = None


class TextSplitFiles(Section):
    """data.files of a text corpus split as the user names it: each split's files or globs (relative to
    data.root). Without validation files, validation is carved from the training files."""

    train: list[str] = Field(min_length=1)
    validation: list[str] | None = None
    test: list[str] = Field(min_length=1)

    @field_validator("train", "validation", "test", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


def _files_kind(v: Any) -> str:
    """Which form data.files takes: the text splits named (train, validation, test), IDX files, or a list."""
    if isinstance(v, TextSplitFiles) or (isinstance(v, dict) and {"train", "validation", "test"} & set(v)):
        return "TextSplitFiles"
    return "list" if isinstance(v, (list, tuple, str)) else "IdxFiles"


FILES_TAGS = ("IdxFiles", "TextSplitFiles", "list")  # data.files' forms, left out of an error's key path
TEXT_ONLY_DATA = ("seq_len", "max_train_tokens", "max_eval_tokens", "text_field")


class DataConfig(Section):
    # digits: the embedded demo; fashion-mnist and idx: IDX files with their official train/test split
    # (the validation split is carved from train); imagefolder: ROOT/CLASS/*.jpg
    # text (task causal-lm): data.files lists files or globs (relative to data.root), default Python's
    # standard library sources; split by file (or the splits named: {train, validation, test}), cut into
    # blocks of seq_len tokens; a JSON Lines file gives one document per record (its text_field)
    dataset: Literal["digits", "fashion-mnist", "idx", "imagefolder", "text"] = "digits"
    root: str | None = None
    files: Annotated[Annotated[IdxFiles, Tag("IdxFiles")] | Annotated[TextSplitFiles, Tag("TextSplitFiles")]
                     | Annotated[list[str], Tag("list")], Discriminator(_files_kind)] | None = None
    text_field: str = Field("text", min_length=1)
    seq_len: int = Field(256, ge=8, le=32768)
    max_train_tokens: int | None = Field(None, ge=1)
    max_eval_tokens: int | None = Field(None, ge=1)
    image_size: int = Field(32, ge=8, le=1024)
    val_fraction: float = Field(0.2, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    labeled_fraction: float = Field(1.0, gt=0, le=1.0)
    unlabeled_root: str | None = None
    batch_size: int = Field(64, ge=1, le=4096)
    augment: bool = True
    # image folders are decoded per batch; this many MB of decoded images are kept for the next epoch
    decoded_cache_mb: float = Field(1024, ge=0)

    @field_validator("files", mode="before")
    @classmethod
    def _one_file(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    def key_dump(self) -> dict:
        """The settings that shape the data, for cache keys: the text-only keys are left out of an image
        dataset's dump, so adding them did not invalidate caches built before."""
        out = self.model_dump(mode="json")
        if self.dataset != "text":
            for k in TEXT_ONLY_DATA:
                out.pop(k, None)
        return out

    @model_validator(mode="after")
    def _root_for_imagefolder(self) -> DataConfig:
        if self.dataset in ("imagefolder", "idx") and not self.root:
            raise ValueError(f"data.root is required when data.dataset is {self.dataset}")
        if isinstance(self.files, (list, TextSplitFiles)):
            if self.dataset != "text":
                raise ValueError("data.files as files or globs (or text splits) needs data.dataset text")
            if not self.files:
                raise ValueError("data.files is empty; list files or globs, or leave it out for the default corpus")
        elif self.files is not None and self.dataset not in ("idx", "fashion-mnist"):
            raise ValueError("data.files names IDX files: it needs data.dataset idx or fashion-mnist")
        return self
