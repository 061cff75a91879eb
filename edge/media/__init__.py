"""Images in: PNG, JPEG and DICOM decoding with bounded reads, and the encoded-image cache."""
