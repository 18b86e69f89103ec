"""Synthetic radiographs as DICOM Secondary Capture files (pydicom), marked as synthetic.

A file holds one 16-bit MONOCHROME2 frame, `ImageType` DERIVED\\SECONDARY, `ConversionType` SYN (DICOM's
"synthetic image"), the prompt in `ImageComments` (LT) and "synthetic" in `SeriesDescription` and
`ImageComments`. No date, time or random UID: the UIDs derive from `uid_source`, so writing the same
image twice gives the same bytes.
"""
from __future__ import annotations

import os

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

SERIES_DESCRIPTION = "synthetic chest radiograph (cxr_ldm)"


def write_dicom(path: str | os.PathLike, image: np.ndarray, prompt: str, uid_source: str,
                series_source: str) -> None:
    """Writes `image` to `path` atomically (temp name, then rename).

    Args:
      image: uint16 (H, W) or (H, W, 1), 0 = black.
      prompt: the text the image was generated from.
      uid_source: text unique to this image (e.g. the run's digest and the row); its SOP instance UID
        derives from it.
      series_source: text shared by the images of one data set; the study and series UIDs derive from it.
    """
    if image.dtype != np.uint16:
        raise ValueError(f"Expected a uint16 image, got {image.dtype}.")
    pixels = image.reshape(image.shape[:2])
    instance_uid = generate_uid(entropy_srcs=["instance", uid_source])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = instance_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study", series_source])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", series_source])
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Modality = "OT"
    ds.ConversionType = "SYN"
    ds.BurnedInAnnotation = "NO"
    ds.PatientName = "SYNTHETIC^CXR"
    ds.PatientID = "SYNTHETIC"
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.ImageComments = f"Synthetic image generated from a text prompt, not of a patient. Prompt: {prompt}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, "<u2").tobytes()
    tmp = f"{os.fspath(path)}.tmp"
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)
