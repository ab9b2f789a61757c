"""Audio analysis service: BPM, musical key and mood for the files of a media library."""

__version__ = "0.1.0"
