"""Pure, batched camera geometry (OpenCV conventions; shapes in each function's docstring)."""
from gld.geometry.align import apply_sim3, umeyama
from gld.geometry.cameras import (
    CameraError, c2w_to_w2c, check_cameras, crop_intrinsics, denormalize_intrinsics,
    make_intrinsics, normalize_intrinsics, opencv_to_opengl, opengl_to_opencv, resize_intrinsics,
    rigid_inverse, to_homogeneous, w2c_to_c2w,
)
from gld.geometry.poses import normalize_poses, relative_poses
from gld.geometry.rays import pixel_grid, plucker_rays, ray_directions
from gld.geometry.rotations import quat_to_rotmat, rotation_angle, rotmat_to_quat

__all__ = [
    "apply_sim3", "umeyama", "CameraError", "c2w_to_w2c", "check_cameras", "crop_intrinsics",
    "denormalize_intrinsics", "make_intrinsics", "normalize_intrinsics", "opencv_to_opengl",
    "opengl_to_opencv", "resize_intrinsics", "rigid_inverse", "to_homogeneous", "w2c_to_c2w",
    "normalize_poses", "relative_poses", "pixel_grid", "plucker_rays", "ray_directions",
    "quat_to_rotmat", "rotation_angle", "rotmat_to_quat",
]
