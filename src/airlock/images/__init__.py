"""Guest images for the microVM runtimes (``qemu``, ``firecracker``), built from Debian
packages only (``airlock image build --flavor browser|cli|minimal``).

An image is a directory ``{image dir}/{flavor}-{key}/`` where ``key`` hashes everything
that goes into it (flavor, package list, the guest agent's source, the build code; for
``cli`` also the Node.js binary and the vendor CLIs' lockfile, copied from the host's
install, see ``build.vendor_clis``), so a change to any of them builds a new image and an
unchanged one is reused. Its files:

``vmlinuz``       the Debian cloud kernel as shipped (bzImage): QEMU ``-kernel``
``vmlinux``       the same kernel uncompressed (ELF): Firecracker ``boot-source``
``initrd.img``    a lean initramfs (busybox + the virtio/vsock modules), see ``kernel``
``rootfs.ext4``   the root filesystem (raw ext4): a VM gets its own copy-on-write overlay
``manifest.json`` flavor, key, kernel version, packages, sizes, ``cmdline``

Boot with ``cmdline`` (``console=ttyS0 root=/dev/vda rw ...``). The root filesystem's
``/sbin/airlock-init`` is PID 1: it mounts the basics, reads the VM's config from the
second disk (``/dev/vdb``: JSON padded with NUL bytes: ``secret``, ``role``, ``screen``),
and starts the guest agent (``/opt/airlock``, ``python3 -m airlock.agent.server``) and, when
a virtio-serial port named ``org.airlock.mux`` exists, the channel multiplexer
(``airlock.agent.mux``) that carries the agent, VNC and egress streams over it.
"""

from airlock.images.build import (
    FLAVORS,
    Image,
    ImageBuildError,
    build_image,
    find_image,
    image_key,
)

__all__ = ["FLAVORS", "Image", "ImageBuildError", "build_image", "find_image", "image_key"]
