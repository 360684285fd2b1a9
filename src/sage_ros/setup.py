from glob import glob

from setuptools import find_packages, setup

package_name = 'sage_ros'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*']),
    package_data={'sage_ros': ['data/*.tsv']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='sage_ros maintainers',
    maintainer_email='maintainers@sage-ros.dev',
    description='SAGE cognition kernel as a ROS 2 node graph',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'sage = sage_ros.cli.main:main',
            'kernel = sage_ros.nodes.launcher:kernel',
            'text_sensor = sage_ros.nodes.launcher:text_sensor',
            'language_block = sage_ros.nodes.launcher:language_block',
            'model_manager = sage_ros.nodes.launcher:model_manager',
            'reasoning_block = sage_ros.nodes.launcher:reasoning_block',
            'memory_block = sage_ros.nodes.launcher:memory_block',
            'perception_block = sage_ros.nodes.launcher:perception_block',
            'microphone = sage_ros.nodes.launcher:microphone',
            'camera = sage_ros.nodes.launcher:camera',
        ],
    },
)
