"""tools/flash: provision a device with edge-agent (into a directory, a disk image or over SSH).

Modules: ``cli`` (arguments, the three targets), ``plan`` (desired state -> changes, applied or
printed), ``fsops`` (file operations on a root directory; also the helper that runs on the far
side of an SSH connection), ``image`` (MBR partitions, ext4 through debugfs, FAT through mtools),
``sshfs`` (the SSH client side), ``accounts`` (passwd/group/shadow edits), ``bootcfg``
(config.txt), ``bundle`` (the offline wheel bundle), ``progress`` (a stderr progress bar).
Standard library only: it runs with the system python3.
"""
