# Environment for running the stack from the venv (sourced by the other scripts).
# Keeps DDS discovery on this machine, lets camera-sized frames through and renders LIBERO
# headless.
export MUJOCO_GL="${MUJOCO_GL:-egl}"
export PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
# Fast DDS profile with a 16 MiB shared-memory segment (default 512 KiB): without it, best-effort
# images of 0.9 MB and more (640x480 rgb8 and up) are lost between processes, silently. The
# segment is the publishing process's, so a camera driver needs this variable as much as the
# policy does (config/fastdds_large_data.xml; README, "Camera frames between processes").
rsd_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$rsd_root/config/fastdds_large_data.xml}"
unset rsd_root
