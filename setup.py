from glob import glob
import os

from setuptools import find_packages, setup

package_name = 'rsd_ros'


def tree(source: str, destination: str) -> list[tuple[str, list[str]]]:
    """data_files entries installing every file under source into destination."""
    return [(os.path.normpath(os.path.join(destination, os.path.relpath(root, source))),
             [os.path.join(root, name) for name in files])
            for root, _, files in os.walk(source) if files]


setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(include=['rsd_core', 'rsd_core.*', 'rsd_ros', 'rsd_ros.*',
                                    'sim_bridge', 'sim_bridge.*']),
    package_data={'rsd_core': ['data/*']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.xml')),
        # Parameter files and the Fast DDS profile (FASTDDS_DEFAULT_PROFILES_FILE).
        ('share/' + package_name + '/config', glob('config/*.yaml') + glob('config/*.xml')),
        # The trained default bundle (main + action tokenizer + draft), found by the nodes.
        *tree('models/default', 'share/' + package_name + '/models/default'),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='RSD developers',
    maintainer_email='rsd@example.org',
    description='Residual speculative decoding for VLA policies, as a ROS 2 package',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'rsd = rsd_ros.cli:main',
            'rsd_policy = rsd_ros.policy_main:main',
            'libero_bridge = sim_bridge.bridge_node:main',
            'libero_expert = sim_bridge.expert_node:main',
        ],
    },
)
