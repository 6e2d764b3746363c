<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<!-- Objects of several classes: the class number of each pixel in a categorical palette; background clear. -->
<qgis version="3.40.6-Bratislava" styleCategories="Symbology">
  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="0.8" alphaBand="-1" nodataColor="">
      <colorPalette>
        <paletteEntry value="0" label="background" color="#000000" alpha="0"/>
        <paletteEntry value="1" label="class 1" color="#ffd700" alpha="255"/>
        <paletteEntry value="2" label="class 2" color="#00bfff" alpha="255"/>
        <paletteEntry value="3" label="class 3" color="#ff4500" alpha="255"/>
        <paletteEntry value="4" label="class 4" color="#7cfc00" alpha="255"/>
        <paletteEntry value="5" label="class 5" color="#ff1493" alpha="255"/>
        <paletteEntry value="6" label="class 6" color="#9370db" alpha="255"/>
        <paletteEntry value="7" label="class 7" color="#00ced1" alpha="255"/>
        <paletteEntry value="8" label="class 8" color="#ff8c00" alpha="255"/>
        <paletteEntry value="9" label="class 9" color="#adff2f" alpha="255"/>
        <paletteEntry value="10" label="class 10" color="#dc143c" alpha="255"/>
        <paletteEntry value="11" label="class 11" color="#1e90ff" alpha="255"/>
        <paletteEntry value="12" label="class 12" color="#f0e68c" alpha="255"/>
      </colorPalette>
    </rasterrenderer>
    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>
    <huesaturation saturation="0" grayscaleMode="0" colorizeOn="0"/>
    <rasterresampler maxOversampling="2"/>
  </pipe>
  <blendMode>0</blendMode>
</qgis>
