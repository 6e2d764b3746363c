<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<!-- Semantic change: band 2 (the class after the change) in a categorical palette; unchanged pixels clear. -->
<qgis version="3.40.6-Bratislava" styleCategories="Symbology">
  <pipe>
    <rasterrenderer type="paletted" band="2" opacity="0.8" alphaBand="-1" nodataColor="">
      <colorPalette>
        <paletteEntry value="0" label="no change" color="#000000" alpha="0"/>
        <paletteEntry value="1" label="class 1" color="#1f78b4" alpha="255"/>
        <paletteEntry value="2" label="class 2" color="#33a02c" alpha="255"/>
        <paletteEntry value="3" label="class 3" color="#e31a1c" alpha="255"/>
        <paletteEntry value="4" label="class 4" color="#ff7f00" alpha="255"/>
        <paletteEntry value="5" label="class 5" color="#6a3d9a" alpha="255"/>
        <paletteEntry value="6" label="class 6" color="#b15928" alpha="255"/>
        <paletteEntry value="7" label="class 7" color="#a6cee3" alpha="255"/>
        <paletteEntry value="8" label="class 8" color="#b2df8a" alpha="255"/>
        <paletteEntry value="9" label="class 9" color="#fb9a99" alpha="255"/>
        <paletteEntry value="10" label="class 10" color="#fdbf6f" alpha="255"/>
        <paletteEntry value="11" label="class 11" color="#cab2d6" alpha="255"/>
        <paletteEntry value="12" label="class 12" color="#ffff99" alpha="255"/>
      </colorPalette>
    </rasterrenderer>
    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>
    <huesaturation saturation="0" grayscaleMode="0" colorizeOn="0"/>
    <rasterresampler maxOversampling="2"/>
  </pipe>
  <blendMode>0</blendMode>
</qgis>
