from glob import glob

from setuptools import find_packages, setup

package_name = 'vlm_vpr'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(include=['vlm_vpr', 'vlm_vpr.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='vlm_vpr developers',
    maintainer_email='vlm-vpr@example.org',
    description='Visual place recognition with VLM re-ranking: a pose prior for a lost robot.',
    license='Apache-2.0',
    python_requires='>=3.11',
    entry_points={
        'console_scripts': [
            'vlm-vpr = vlm_vpr.cli:main',
            'vpr_node = vlm_vpr.ros.node:main',
        ],
    },
)
