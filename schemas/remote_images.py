"""What the reading-queue API tells a remote infer worker about a study's rendered PNGs.

Shared by the API (``api/worker_images.py``, which serves it) and the worker
(``worker/inference/images.py``, which reads it), so both sides agree on the
routes and the fields. Nothing here names a patient: a worker token sees the
Study Instance UID, the images and how they were windowed, never an identity.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

#: Every route a ``worker``-role token may use, under the API's base URL (PREREAD_IMAGES_URL).
WORKER_PREFIX = "/api/v1/worker"
WHOAMI_PATH = f"{WORKER_PREFIX}/whoami"
MANIFEST_PATH = WORKER_PREFIX + "/studies/{study_uid}/manifest"
IMAGE_PATH = WORKER_PREFIX + "/studies/{study_uid}/images/{n}"


class RemoteImage(BaseModel):
    """One rendered PNG, numbered from 0 in the order the model sees them, with what verifies its bytes."""

    model_config = ConfigDict(frozen=True)

    n: int = Field(ge=0, description="Position in the study's images, from 0; the PNG is at IMAGE_PATH with this n.")
    image_id: int = Field(description="The images row's id: a re-rendered study has new ids.")
    sop_instance_uid: str
    frame: int = Field(ge=0)
    width: int
    height: int
    window: str | None = None
    window_center: float | None = None
    window_width: float | None = None
    size: int = Field(ge=0, description="Bytes of the PNG.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the PNG, lowercase hex.")


class RemoteManifest(BaseModel):
    """A study's rendered PNGs as the infer step needs them."""

    model_config = ConfigDict(frozen=True)

    study_instance_uid: str
    state: str = Field(description="The study's state when the manifest was made (infer expects RENDERED).")
    images: list[RemoteImage]


class WorkerIdentity(BaseModel):
    """Who the API takes a worker token for: the readiness check of a remote infer worker."""

    name: str
    role: str
