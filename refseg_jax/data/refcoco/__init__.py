"""RefCOCO, RefCOCO+ and RefCOCOg from the `refer` downloads (docs/refcoco.md).

    builder.py       the TFDS builder (`refcoco/<config>`, manual download)
    refer_files.py   safe readers of the refs pickles, instances.json, masks
    check.py         split sizes against the published ones (a command)
"""
