// Empty stand-in: emu.h (force-included) provides what the kernels use from this header.
#pragma once
